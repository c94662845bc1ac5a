"""docker/Dockerfile cannot be built here (no registry for images); check it agrees with pyproject.toml."""

import re
import tomllib

from conftest import REPO


def test_dockerfile_matches_the_package():
    text = (REPO / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = re.search(r"^FROM pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-devel$", text, re.M)
    assert base, "the base must be a CUDA *devel* PyTorch image (DeepSpeed compiles its ops with nvcc)"
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch"))
    low, high = re.search(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", torch_req).groups()[:2], re.search(r"<(\d+)\.(\d+)", torch_req).groups()
    version = tuple(map(int, base.groups()))
    assert tuple(map(int, low)) <= version < tuple(map(int, high)), f"the image's torch {version} is outside {torch_req}"
    extras = re.search(r'pip install --no-cache-dir "\.\[(\w+)\]"', text).group(1)
    assert extras in project["optional-dependencies"] and any(d.startswith("deepspeed") for d in project["optional-dependencies"][extras])
    assert re.search(r'^ENTRYPOINT \["(\w+)"\]$', text, re.M).group(1) in project["scripts"]
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
