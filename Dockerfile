# One image for every role of docker-compose.yml: fl-server, fl-client, fl-hub and fl-sim.
#
#   docker build -t fedlora .                 # CPU PyTorch, as `make install`
#   docker build -t fedlora --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # a CUDA build
FROM python:3.11-slim

# The CPU wheel of the Makefile's torch release; override both for another build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Match your own uid to share bind-mounted files (./data, say) with the containers.
ARG FEDLORA_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# torch first, in its own layer: the project's `torch>=...` is then already satisfied, so
# `pip install .` keeps this build instead of fetching PyPI's default (CUDA) wheel.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

COPY . /tmp/fedlora
RUN pip install /tmp/fedlora && rm -rf /tmp/fedlora

# A non-root user owns the mount points of docker-compose.yml's named volumes: an empty named
# volume takes the owner and mode of the image directory it is first mounted on.
#   /srv/fedlora       server directory (CA and server keys, server.toml, enrolled nodes)
#   /srv/fedlora/runs  run directories
#   /certs             ca.pem and hub.pub only, what the clients get
#   /keys, /state      one client's node key; its privacy ledger and DP secret
#   /srv/hub           hub directory (signing key, database, adapter files, operator token)
#   /hub-publish       operator.token and hub.pub, what the SuperLink gets to publish to the hub
RUN useradd --create-home --uid "${FEDLORA_UID}" --user-group fedlora \
    && install -d -o fedlora -g fedlora -m 0700 /srv/fedlora /srv/fedlora/runs /keys /state \
    && install -d -o fedlora -g fedlora -m 0700 /srv/hub /hub-publish \
    && install -d -o fedlora -g fedlora -m 0755 /certs

USER fedlora
WORKDIR /home/fedlora
EXPOSE 9092 9480
CMD ["fl-server", "--help"]
