# Mongo Mail Server in a container. Built and run in CI (.ci/container), as the README shows:
#   docker build -t mms .      (podman: podman build --format docker -t mms .)
#   docker run -d --name mms -v mms-spool:/var/spool/mms \
#     -e MMS_MONGODB_URI=mongodb://db.example/message -e MMS_ALLOW=127.0.0.1,10.88.0.1,172.17.0.1 \
#     -p 127.0.0.1:14001:14001 -p 127.0.0.1:9425:9425 mms
FROM python:3.11-slim
COPY requirements.txt /opt/mms/
# The versions tested here, so that a rebuild installs what was tested.
RUN pip install --no-cache-dir -r /opt/mms/requirements.txt pymongo==4.20.1 dnspython==2.9.2 \
 && useradd --system --home-dir /opt/mms mms \
 && install -d -o mms -g mms -m 0700 /var/spool/mms
COPY mms.py /opt/mms/
COPY plugins /opt/mms/plugins
USER mms
WORKDIR /opt/mms
# Proxy and filter modes spool here what MongoDB could not take: keep it past the container.
VOLUME /var/spool/mms
# Scrapes reach a container from its engine's bridge (a private address): narrow
# MMS_METRICS_ALLOW to your Prometheus with -e.
ENV MMS_METRICS=0.0.0.0:9425 \
    MMS_METRICS_ALLOW=127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16
EXPOSE 14001 9425
# check finds the server however it was started, and its probe is no mail. It exits
# 0 (OK), 1 (WARNING: proxy or filter mode spooling, mail flows) or 2 (CRITICAL);
# Docker wants 0 healthy, 1 unhealthy.
HEALTHCHECK --interval=60s --timeout=30s CMD ["sh", "-c", "python /opt/mms/mms.py check; [ $? -lt 2 ]"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/opt/mms/mms.py"]
