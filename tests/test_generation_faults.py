"""Faults while the plugin generates: CUDA out-of-memory halves the batch (answers unchanged, the size used
recorded), and an image or video that cannot be decoded fails naming the task, the doc and the file."""
import pytest
import torch
from PIL import Image, ImageFile

from test_lmms_plugin import DOCS, _requests
from visiondrop.harness.lmms_model import PrunedLVLM, UndecodableVisual


def test_cuda_out_of_memory_halves_the_batch_down_to_what_fits(tiny_dir, monkeypatch):
    """torch.cuda.OutOfMemoryError is raised (as on a GPU) by any forward of more than one sample: a batch of 4
    runs as halves, then ones, the rest of the run keeps size 1, and the answers equal those of batch size 1."""
    alone = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64, batch_size=1)
    alone.task_dict = {"demo": {"test": DOCS}}
    expected = alone.generate_until(_requests("generate_until"))
    expected_nll = [r.text[0] for r in alone.loglikelihood(_requests("loglikelihood"))]

    lm = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64, batch_size=4)
    lm.task_dict = {"demo": {"test": DOCS}}
    sizes = []
    generate, forward = lm.model.generate, lm.model.forward

    def fits(batch_size):
        sizes.append(batch_size)
        if batch_size > 1:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {batch_size}")

    monkeypatch.setattr(lm.model, "generate", lambda **kw: fits(kw["input_ids"].shape[0]) or generate(**kw))
    assert lm.generate_until(_requests("generate_until")) == expected
    assert sizes == [4, 2, 1, 1, 1, 1]  # the first batch halved twice; the others ran at the size that fit
    assert lm.run_info["batch_size"] == 4 and lm.run_info["batch_size_used"] == 1 and lm.run_info["oom_retries"] == 2
    assert lm.run_info["samples"] == len(DOCS) and lm.run_info["measured_tokens_mean"] == 64

    lm.reset_measurements()
    sizes.clear()
    monkeypatch.setattr(lm.model, "forward", lambda *a, **kw: fits(kw["input_ids"].shape[0]) or forward(*a, **kw))
    assert [r.text[0] for r in lm.loglikelihood(_requests("loglikelihood"))] == pytest.approx(expected_nll, abs=1e-4)
    assert sizes[:3] == [4, 2, 1] and lm.run_info["batch_size_used"] == 1

    lm.reset_measurements()
    monkeypatch.setattr(lm.model, "generate", lambda **kw: fits(2))  # even one sample does not fit: the error stays
    with pytest.raises(torch.cuda.OutOfMemoryError):
        lm.generate_until(_requests("generate_until"))


def test_an_undecodable_image_fails_naming_the_doc_and_the_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # PIL's default; some lmms-eval tasks set it
    broken = tmp_path / "broken.png"
    DOCS[2]["image"].save(broken)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: PIL opens it lazily, decoding fails later
    docs = [dict(DOCS[0]), {**DOCS[2], "image": Image.open(broken)}]
    lm = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64)
    lm.task_dict = {"demo": {"test": docs}}
    with pytest.raises(UndecodableVisual, match=f"demo doc 1: cannot decode {broken} "):
        lm.generate_until(_requests("generate_until")[:2])


def test_an_undecodable_video_fails_naming_the_doc_and_the_file(tiny_video_dir, demo_videos, tmp_path):
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(demo_videos[0].read_bytes()[:600])  # a cut-off download
    docs = [{"video": str(demo_videos[1]), "question": "What moves?"}, {"video": str(broken), "question": "And?"}]
    lm = PrunedLVLM(pretrained=str(tiny_video_dir), method="visiondrop", budget=0.25 * 2056)
    lm.task_dict = {"qa": {"test": docs}}
    requests = [r for r in _requests("generate_until")[:2]]
    for i, request in enumerate(requests):
        request.arguments = (docs[i]["question"], request.args[1], lambda doc: [doc["video"]], i, "qa", "test")
    with pytest.raises(UndecodableVisual, match=f"qa doc 1: cannot decode the video {broken} "):
        lm.generate_until(requests)
