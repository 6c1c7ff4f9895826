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
# Scrapes reach a container from its engine's bridge (a private address): narrow
# MMS_METRICS_ALLOW to your Prometheus with -e.
ENV MMS_HOST=0.0.0.0 MMS_PORT=14001 MMS_METRICS=0.0.0.0:9425 \
    MMS_METRICS_ALLOW=127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16
EXPOSE 14001 9425
HEALTHCHECK --interval=60s --timeout=30s CMD ["python", "/opt/mms/mms.py", "check"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/opt/mms/mms.py"]
