# The Airflow image of this project: the official Airflow 3.3.2 image (Python 3.11), plus what the migration
# engine needs on the workers, and the project's code. Built by docker-compose.yaml (`build: .`), which mounts
# dags/, plugins/, include/ and config/ over the copies baked in here; the Helm values (deploy/helm/values.yaml)
# run the image as it is (no DAG volume: the code is in the image).
FROM apache/airflow:3.3.2-python3.11

USER root
# qemu-utils: qemu-img for disk format conversion; libvirt-clients: virsh for debugging;
# libvirt-dev, pkg-config and gcc: to build libvirt-python from its sdist (libvirt-dev brings libvirt0).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        qemu-utils \
        libvirt-clients \
        libvirt-dev \
        pkg-config \
        gcc \
    && apt-get autoremove -yqq --purge \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
# Mount points of the volumes, owned by airflow so that new volumes start out writable.
RUN mkdir -p /opt/airflow/store /opt/airflow/staging /opt/airflow/cfg /mnt/migrations \
    && chown airflow:0 /opt/airflow/store /opt/airflow/staging /opt/airflow/cfg /mnt/migrations

USER airflow
# requirements.txt pins apache-airflow itself to the image's version, so pip cannot move it.
COPY --chown=airflow:0 requirements.txt /opt/airflow/requirements.txt
RUN pip install --no-cache-dir -r /opt/airflow/requirements.txt

# The project's code: DAGs, plugins (hooks, operators, triggers), the engine (include/) and the pools file.
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 include /opt/airflow/include
COPY --chown=airflow:0 config/pools.json /opt/airflow/config/pools.json
ENV PYTHONPATH=/opt/airflow
