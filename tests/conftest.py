import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "offline"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker per core (make test): more threads would only contend
    torch.set_num_threads(1)

from parity import PARITY  # noqa: E402


@pytest.fixture(scope="session")
def parity_model():
    """The tiny full-depth LLaVA-1.5 the official implementations ran on (float32, SDPA)."""
    from transformers import LlavaForConditionalGeneration

    if not PARITY.exists():
        pytest.fail(f"parity fixtures not found at {PARITY}: clone the project with ../shared beside it "
                    "or set VISIONDROP_SHARED")
    return LlavaForConditionalGeneration.from_pretrained(PARITY / "visiondrop" / "hf_model",
                                                         dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dir_of(tmp_path_factory):
    """model_type -> the folder of a tiny full-depth model of that registered family (`testing.tiny.build_tiny`),
    saved like a user's checkpoint, built once per session."""
    from visiondrop.testing.tiny import build_tiny

    built = {}

    def folder(model_type: str):
        if model_type not in built:
            built[model_type] = build_tiny(model_type, tmp_path_factory.mktemp(model_type) / model_type, seed=0)
        return built[model_type]

    return folder


@pytest.fixture(scope="session")
def tiny_of(tiny_dir_of):
    """model_type -> (model, processor) of that family's tiny model, loaded once per session: how the contract
    matrix reaches every registered family."""
    from visiondrop.testing.tiny import load_tiny

    loaded = {}

    def model(model_type: str):
        if model_type not in loaded:
            loaded[model_type] = load_tiny(tiny_dir_of(model_type))
        return loaded[model_type]

    return model


# Each family's by name, for its own tests.
@pytest.fixture(scope="session")
def tiny_dir(tiny_dir_of):
    return tiny_dir_of("llava")


@pytest.fixture(scope="session")
def tiny(tiny_of):
    return tiny_of("llava")


@pytest.fixture(scope="session")
def tiny_next_dir(tiny_dir_of):
    return tiny_dir_of("llava_next")


@pytest.fixture(scope="session")
def tiny_next(tiny_of):
    return tiny_of("llava_next")


@pytest.fixture(scope="session")
def tiny_video_dir(tiny_dir_of):
    return tiny_dir_of("video_llava")


@pytest.fixture(scope="session")
def tiny_video(tiny_of):
    return tiny_of("video_llava")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tiny_dir_of):
    return tiny_dir_of("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_of):
    return tiny_of("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_onevision_dir(tiny_dir_of):
    return tiny_dir_of("llava_onevision")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_dir_of):
    return tiny_dir_of("qwen3_vl")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_of):
    return tiny_of("qwen3_vl")


@pytest.fixture(scope="session")
def tiny_shallow(tmp_path_factory):
    """A tiny LLaVA-1.5 with the demo model's 4-layer decoder (cut layers map onto it by relative depth)."""
    from visiondrop.testing.tiny import build_tiny, load_tiny

    return load_tiny(build_tiny("llava", tmp_path_factory.mktemp("shallow") / "llava", seed=0, text_layers=4))


@pytest.fixture(scope="session")
def demo_videos(tmp_path_factory):
    """Three short synthetic clips written as .mp4 files (24, 16 and 40 frames)."""
    from visiondrop.testing.videos import write_demo_video

    folder = tmp_path_factory.mktemp("videos")
    return [write_demo_video(folder / f"clip{i}.mp4", seed=i, length=n) for i, n in enumerate((24, 16, 40))]


