# Mongo Mail Server: docker build -t mms . && docker run -e MMS_MONGODB_URI=mongodb://db/message -p 14001:14001 mms
FROM python:3.11-slim
COPY requirements.txt /opt/mms/
RUN pip install --no-cache-dir -r /opt/mms/requirements.txt \
 && useradd --system --home-dir /opt/mms mms \
 && install -d -o mms -g mms /var/spool/mms
COPY mms.py /opt/mms/
COPY plugins /opt/mms/plugins
USER mms
WORKDIR /opt/mms
ENV MMS_HOST=0.0.0.0 MMS_PORT=14001 MMS_METRICS=0.0.0.0:9425
EXPOSE 14001 9425
HEALTHCHECK --interval=30s --timeout=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9425/healthz', timeout=5)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/opt/mms/mms.py"]
