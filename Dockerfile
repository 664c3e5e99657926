# docker build -t ghcr.io/your-org/kard-ray:2.60.0-py311-gpu . && docker push ghcr.io/your-org/kard-ray:2.60.0-py311-gpu
#
# One image for every node (CPU head, CPU workers, GPU workers) of the launcher and KubeRay
# configs in cluster/. Its tag repeats the base image's tag: the Ray version baked in here must be
# the one pinned in pyproject.toml and named in cluster/*.yaml (tests/test_cluster.py checks it).
FROM rayproject/ray:2.60.0-py311-gpu

# The base image runs as user `ray` (home /home/ray) with its Python on PATH.
WORKDIR /home/ray/kard-ray

# torch first, at the version vLLM 0.29.0 (the `gpu` extra) pins; PyPI's Linux wheel is the CUDA
# build. Then the package with its GPU extra; Ray itself is already in the image at the pinned
# version, so pip keeps it.
RUN pip install --no-cache-dir "torch==2.13.0"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users kard_ray/ kard_ray/
RUN pip install --no-cache-dir ".[gpu]" \
    && python -c "import ray, torch, kard_ray; assert ray.__version__ == '2.60.0', ray.__version__"

# Job entrypoints and configs stay in the working directory (not in site-packages): RayJob uses
# this directory as its runtime_env working_dir, and `ray job submit --working-dir .` replaces it.
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users configs/ configs/

# Serve's HTTP proxies read these when Ray starts them (kard_ray.serve.proxy.proxy_environment; `kard-ray serve`
# sets them itself for the Ray it starts): the admission gate and JSON refusals, and the proxy's call to the
# Ingress by value. Every node of the cluster configs runs this image, so every proxy has them.
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=kard_ray.serve.proxy:middlewares \
    RAY_SERVE_PROXY_USE_GRPC=1
