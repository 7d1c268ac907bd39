"""The production files agree with the code they ship.

No Docker engine (nor the compose plugin) runs on the development machines, so `docker compose
config` cannot check them here; these tests catch the drift that would otherwise surface only on
a GPU host: a setting renamed in code but not in the compose file, a command the CLI no longer
takes, a module that imports a package its image does not install.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

from common.celery_config import INFERENCE_QUEUE, TRAINING_QUEUE
from common.settings import Settings
from workers.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# variables the compose file itself interpolates (ports, replica counts), not read by Settings
COMPOSE_ONLY = {"FAIRDIFF_PORT", "FAIRDIFF_INFERENCE_REPLICAS"}
LOCAL_PACKAGES = {"common", "service", "workers", "adaptors", "testbed", "benchmarks", "tests"}


def test_every_fairdiff_variable_in_the_compose_file_is_a_setting():
    """Over the whole text: the services' environment, the interpolations and the header comment."""
    text = (ROOT / "docker-compose.yml").read_text()
    mentioned = set(re.findall(r"\bFAIRDIFF_[A-Z_]+[A-Z]\b", text)) - COMPOSE_ONLY
    unknown = mentioned - {"FAIRDIFF_" + name.upper() for name in Settings.model_fields}
    assert not unknown, f"docker-compose.yml names variables no setting reads: {sorted(unknown)}"


def test_compose_commands_are_ones_the_cli_accepts_for_real_queues():
    parser = build_parser()
    queues = set()
    for service in COMPOSE["services"].values():
        commands = [service.get("command"), (service.get("healthcheck") or {}).get("test")]
        for command in filter(None, commands):
            argv = [a for a in command if a not in ("CMD", "CMD-SHELL")]
            if argv[0] != "fairdiff":
                continue
            args = parser.parse_args(argv[1:])  # SystemExit (a failure) if the CLI refuses it
            queues.add(args.queue)
    assert queues == {INFERENCE_QUEUE, TRAINING_QUEUE}


def test_compose_builds_from_files_that_exist_and_declares_its_volumes():
    declared = set(COMPOSE["volumes"])
    for name, service in COMPOSE["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name} mounts undeclared volume {source}"


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_copy_paths_that_exist(dockerfile: Path):
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def _third_party_imports(packages: list[str]) -> dict[str, str]:
    """Top-level third-party module -> one file importing it, over the given source folders."""
    found: dict[str, str] = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL_PACKAGES:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _requirements(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~ ]", line)[0].lower().replace("_", "-"))
    return names


# what each image installs besides its requirements file: the worker image installs torch first;
# starlette arrives with fastapi
PREINSTALLED = {"gateway": {"starlette"}, "worker": {"torch"}}
IMAGE_SOURCES = {"gateway": ["service", "common"], "worker": ["workers", "adaptors", "common", "testbed"]}


@pytest.mark.parametrize("image", sorted(IMAGE_SOURCES))
def test_each_image_installs_every_package_its_code_imports(image: str):
    installed = _requirements(ROOT / "requirements" / f"{image}.txt")
    distributions = packages_distributions()
    missing = {}
    for module, where in _third_party_imports(IMAGE_SOURCES[image]).items():
        if module in PREINSTALLED[image]:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & installed:
            missing[module] = where
    assert not missing, f"requirements/{image}.txt lacks the packages for {missing}"


def test_the_gateway_image_installs_nothing_with_torch():
    assert not {"torch", "diffusers", "transformers", "peft", "accelerate"} & _requirements(ROOT / "requirements" / "gateway.txt")
