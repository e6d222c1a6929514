import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "offline"

import pytest  # noqa: E402
import torch  # noqa: E402

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
def tiny_dir(tmp_path_factory):
    """A tiny full-depth LLaVA-1.5 (CLIP 24 layers at 336/14, Llama 32 layers) saved like a user's checkpoint."""
    from visiondrop.testing.tiny import build_tiny

    return build_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from visiondrop.testing.tiny import load_tiny

    return load_tiny(tiny_dir)


@pytest.fixture(scope="session")
def tiny_shallow(tmp_path_factory):
    """A tiny LLaVA-1.5 with the demo model's 4-layer decoder (cut layers map onto it by relative depth)."""
    from visiondrop.testing.tiny import build_tiny, load_tiny

    return load_tiny(build_tiny("llava", tmp_path_factory.mktemp("shallow") / "llava", seed=0, text_layers=4))


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    """A tiny full-depth LLaVA-NeXT (anyres, v1.6 grids) saved like a user's checkpoint."""
    from visiondrop.testing.tiny import build_tiny

    return build_tiny("llava_next", tmp_path_factory.mktemp("tiny_next") / "llava_next", seed=0)


@pytest.fixture(scope="session")
def tiny_next(tiny_next_dir):
    from visiondrop.testing.tiny import load_tiny

    return load_tiny(tiny_next_dir)


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory):
    """A tiny full-depth Video-LLaVA (CLIP towers 24 layers at 224/14, Llama 32 layers) saved like a checkpoint."""
    from visiondrop.testing.tiny import build_tiny

    return build_tiny("video_llava", tmp_path_factory.mktemp("tiny_video") / "video_llava", seed=0)


@pytest.fixture(scope="session")
def tiny_video(tiny_video_dir):
    from visiondrop.testing.tiny import load_tiny

    return load_tiny(tiny_video_dir)


@pytest.fixture(scope="session")
def demo_videos(tmp_path_factory):
    """Three short synthetic clips written as .mp4 files (24, 16 and 40 frames)."""
    from visiondrop.testing.videos import write_demo_video

    folder = tmp_path_factory.mktemp("videos")
    return [write_demo_video(folder / f"clip{i}.mp4", seed=i, length=n) for i, n in enumerate((24, 16, 40))]


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny full-depth Qwen2.5-VL (32-block windowed ViT, 28-layer M-RoPE decoder) saved like a user's checkpoint."""
    from visiondrop.testing.tiny import build_tiny

    return build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen") / "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen(tiny_qwen_dir):
    from visiondrop.testing.tiny import load_tiny

    return load_tiny(tiny_qwen_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny full-depth Qwen3-VL (27-block ViT with DeepStack, 36-layer Qwen3 decoder) saved like a checkpoint."""
    from visiondrop.testing.tiny import build_tiny

    return build_tiny("qwen3_vl", tmp_path_factory.mktemp("tiny_qwen3") / "qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_qwen3_dir):
    from visiondrop.testing.tiny import load_tiny

    return load_tiny(tiny_qwen3_dir)
