"""Dataset export formats, each read into the same raw records (``finetune.data.records``) and class map.

One module per format: ``coco`` (COCO JSON, Roboflow's COCO export, COCO 2017), ``yolo`` (Ultralytics and Roboflow
layouts), ``voc`` (Pascal VOC XML), ``label_studio`` (Label Studio's JSON export), ``cvat`` (CVAT for images 1.1
XML); Hugging Face datasets (``save_to_disk`` folders, image folders, the Hub) are read by
``finetune.data.sources``. ``detect`` tells the format from a folder's layout; ``paths`` keeps every path a
dataset names inside the dataset folder; ``xmlfiles`` parses XML with defusedxml; ``archive`` unpacks a zip.
"""

from __future__ import annotations

# The values of the dataset format option (``open_dataset(format=...)``, ``--dataset-format``, ``TrainConfig``).
DATASET_FORMATS: tuple[str, ...] = ("auto", "coco", "yolo", "voc", "label-studio", "cvat", "hf")
_ALIASES = {
    "label_studio": "label-studio",
    "labelstudio": "label-studio",
    "pascal-voc": "voc",
    "pascal_voc": "voc",
    "huggingface": "hf",
    "hugging-face": "hf",
    "datasets": "hf",
}


def normalise_format(name: str | None) -> str:
    """The canonical format name (``label_studio`` -> ``label-studio``); ValueError listing the choices."""
    text = "auto" if name is None else str(name).strip().lower()
    text = _ALIASES.get(text, text)
    if text not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; choose one of {', '.join(DATASET_FORMATS)}")
    return text
