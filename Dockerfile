# modeldeploy images, one file, one target each. Base images and wheel sources are build arguments, so the same
# file builds here, offline (hack/build-images.sh: a Debian bookworm base made by debootstrap, wheels prepared on the
# host, `podman build --network=none`), and elsewhere from a registry's bases and package indexes.
#
#   operator       `modeldeploy` for the operator, the pull Jobs and the monitoring sidecar - no torch.
#   runtime-cpu    + torch (CPU build) and transformers: `modeldeploy serve` on x86_64/arm64 CPUs.
#   runtime-cuda   the runtime on an NVIDIA CUDA runtime base with torch's CUDA wheels, e.g.
#                    --build-arg PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cu128"
#   runtime-loong64  the runtime for Loongson (loong64) on a LoongArch base, torch from Loongson's index, e.g.
#                    --platform linux/loong64 --build-arg LOONG64_BASE_IMAGE=lcr.loongnix.cn/library/python:3.11
#                    --build-arg PIP_ARGS="--index-url https://pypi.loongnix.cn/loongson/pypi"
#   operator-debian  the operator on Debian's own python3 packages plus pure-Python wheels: for architectures PyPI
#                    has few binary wheels for. Loongson: --platform linux/loong64 (DEBIAN_IMAGE: Debian sid, the
#                    suite with the loong64 port).
#   llama.cpp-debian llama.cpp's server from Debian's `llama.cpp` package, e.g. for loong64 the same way.
#   (hack/build-images.sh builds both debian targets for loong64 here, offline, on Debian sid loong64 roots that
#   already carry the packages below: APT_INSTALL=0.)
#
# The build context holds `wheels/` with at least modeldeploy's own wheel (`pip wheel --no-deps .`); with the
# default PIP_ARGS (--no-index) it must hold every dependency too. Wheels are bind-mounted, never copied into a
# layer, so the layer cache cannot see them change: DEPS_DIGEST (the dependencies' wheel names) and SOURCE_DIGEST
# (modeldeploy's own wheel) are passed in to key the two install layers. The dependencies' layer comes first and
# stays cached while only modeldeploy's code changes (it installs modeldeploy for its dependency list, then removes
# it again for the small layer above). Every image runs as 65532 with nothing writable but its volumes.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG LOONG64_BASE_IMAGE=lcr.loongnix.cn/library/python:3.11
ARG PIP_ARGS=--no-index
ARG TORCH_SPEC=torch==2.13.0
ARG DEBIAN_IMAGE=docker.io/library/debian:sid
ARG DEBIAN_OPERATOR_PACKAGES="ca-certificates python3 python3-pip python3-pydantic python3-kubernetes python3-yaml python3-aiohttp python3-httptools python3-prometheus-client python3-huggingface-hub python3-filelock python3-click python3-iso8601 python3-pythonjsonlogger python3-jsonpatch python3-typing-extensions"
ARG DEBIAN_LLAMACPP_PACKAGES="llama.cpp"
ARG APT_INSTALL=1

FROM ${BASE_IMAGE} AS operator
ARG PIP_ARGS
ARG DEPS_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/modeldeploy \
 && /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} --find-links /wheels \
      "modeldeploy[gpu]" \
 && /opt/modeldeploy/bin/pip uninstall -q -y modeldeploy
ARG SOURCE_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index \
      --find-links /wheels modeldeploy
ENV PATH=/opt/modeldeploy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp USER=modeldeploy
USER 65532:65532
ENTRYPOINT ["modeldeploy"]

FROM ${BASE_IMAGE} AS runtime-cpu
ARG PIP_ARGS
ARG TORCH_SPEC
ARG DEPS_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/modeldeploy \
 && /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} --find-links /wheels \
      "${TORCH_SPEC}" "modeldeploy[runtime,gpu]" \
 && /opt/modeldeploy/bin/pip uninstall -q -y modeldeploy
ARG SOURCE_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index \
      --find-links /wheels modeldeploy
ENV PATH=/opt/modeldeploy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp USER=modeldeploy \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["modeldeploy"]

FROM ${CUDA_BASE_IMAGE} AS runtime-cuda
ARG PIP_ARGS
ARG TORCH_SPEC
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ARG DEPS_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/modeldeploy \
 && /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} --find-links /wheels \
      "${TORCH_SPEC}" "modeldeploy[runtime,gpu]" \
 && /opt/modeldeploy/bin/pip uninstall -q -y modeldeploy
ARG SOURCE_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index \
      --find-links /wheels modeldeploy
ENV PATH=/opt/modeldeploy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp USER=modeldeploy \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["modeldeploy"]

FROM ${LOONG64_BASE_IMAGE} AS runtime-loong64
ARG PIP_ARGS
ARG TORCH_SPEC
ARG DEPS_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/modeldeploy \
 && /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} --find-links /wheels \
      "${TORCH_SPEC}" "modeldeploy[runtime]" \
 && /opt/modeldeploy/bin/pip uninstall -q -y modeldeploy
ARG SOURCE_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    /opt/modeldeploy/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index \
      --find-links /wheels modeldeploy
ENV PATH=/opt/modeldeploy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp USER=modeldeploy \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["modeldeploy"]

FROM ${DEBIAN_IMAGE} AS operator-debian
ARG APT_INSTALL
ARG DEBIAN_OPERATOR_PACKAGES
RUN if [ "$APT_INSTALL" = 1 ]; then apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${DEBIAN_OPERATOR_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*; fi
# What Debian does not package, as pure-Python wheels; everything else comes from Debian, hence --no-deps.
ARG SOURCE_DIGEST=
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m pip install --no-cache-dir --disable-pip-version-check --break-system-packages --no-deps \
      --no-index --find-links /wheels kopf modeldeploy
ENV PYTHONDONTWRITEBYTECODE=1 HOME=/tmp USER=modeldeploy
USER 65532:65532
ENTRYPOINT ["modeldeploy"]

FROM ${DEBIAN_IMAGE} AS llama.cpp-debian
ARG APT_INSTALL
ARG DEBIAN_LLAMACPP_PACKAGES
RUN if [ "$APT_INSTALL" = 1 ]; then apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${DEBIAN_LLAMACPP_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*; fi
ENV HOME=/tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["llama-server"]
