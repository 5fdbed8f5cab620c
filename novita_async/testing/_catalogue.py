"""The emulator's ``GET /v3/model`` catalogue: fake models, filters, keyset cursors."""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Catalogue", "default_models"]

# [type]: sd_name | name | flags (xl, inpainting, training/uploading = private) | tags
_TABLE = """
[checkpoint]
sd_xl_base_1.0.safetensors|SDXL 1.0 Base|xl|base
dreamshaperXL_v21TurboDPMSDE_351306.safetensors|DreamShaper XL|xl|fantasy,turbo
juggernautXL_v9Rundiffusionphoto2_348913.safetensors|Juggernaut XL|xl|photorealistic
realvisxlV40_v40Bakedvae_344487.safetensors|RealVisXL V4.0|xl|photorealistic
animagineXLV31_v31_403131.safetensors|Animagine XL 3.1|xl|anime
majicmixRealistic_v6_65516.safetensors|majicMIX realistic||photorealistic,portrait
dreamshaper_8_93211.safetensors|DreamShaper 8||fantasy
realisticVisionV51_v51VAE_94301.safetensors|Realistic Vision V5.1||photorealistic
meinamix_meinaV11_54532.safetensors|MeinaMix||anime
revAnimated_v122_46846.safetensors|ReV Animated||anime,fantasy
sd-v1-5-inpainting_10011.safetensors|SD 1.5 Inpainting|inpainting|inpainting
sd_xl_inpainting_0.1_10012.safetensors|SDXL Inpainting 0.1|xl inpainting|inpainting
my_portrait_model_v1_90001.safetensors|My portrait model|training|portrait
uploaded_checkpoint_90002.safetensors|Uploaded checkpoint|xl uploading|custom
[lora]
add_detail_62833.safetensors|Detail Tweaker||detail
GoodHands-beta2_39807.safetensors|Good Hands||hands
more_details_87153.safetensors|More Details||detail
epi_noiseoffset2_16576.safetensors|epi noise offset||lighting
film_grain_xl_127211.safetensors|Film Grain XL|xl|photorealistic,film
pixel-art-xl_120096.safetensors|Pixel Art XL|xl|pixel art
watercolor_style_xl_145337.safetensors|Watercolor XL|xl|watercolor,painting
detail_tweaker_xl_122359.safetensors|Detail Tweaker XL|xl|detail
my_face_lora_90003.safetensors|My face|training|portrait
[locon]
ink_sketch_locon_88512.safetensors|Ink Sketch||sketch
[vae]
vae-ft-mse-840000-ema-pruned.safetensors|SD VAE ft-MSE||vae
sdxl_vae.safetensors|SDXL VAE|xl|vae
kl-f8-anime2_23906.ckpt|kl-f8-anime2||anime
orangemix.vae_11042.pt|OrangeMix VAE||anime
[textualinversion]
badhandv4_16755.pt|badhandv4||negative,hands
EasyNegative_8743.safetensors|EasyNegative||negative
ng_deepnegative_v1_75t_4629.pt|deepnegative||negative
verybadimagenegative_v1.3_11772.pt|verybadimagenegative||negative
negativeXL_D_118418.safetensors|negativeXL|xl|negative
[upscaler]
RealESRGAN_x4plus_anime_6B.pth|RealESRGAN x4plus anime 6B||upscale,anime
RealESRNet_x4plus.pth|RealESRNet x4plus||upscale
4x-UltraSharp.pth|4x-UltraSharp||upscale
[controlnet]
control_v11p_sd15_canny.pth|ControlNet canny||controlnet
control_v11f1p_sd15_depth.pth|ControlNet depth||controlnet
control_v11p_sd15_openpose.pth|ControlNet openpose||controlnet
"""
_DISPLAY = {
    "checkpoint": "Checkpoint",
    "lora": "LoRA",
    "locon": "LyCORIS",
    "vae": "VAE",
    "textualinversion": "Embedding",
    "upscaler": "Upscaler",
    "controlnet": "ControlNet",
}


def default_models() -> list[dict[str, Any]]:
    """The built-in catalogue: 39 fake models in Novita's ``GET /v3/model`` shape.

    14 checkpoints (7 SDXL, 2 inpainting, 2 private), 9 LoRAs (1 private), one
    ``locon`` (a type outside the filter enum, as Novita has), 4 VAEs, 5
    embeddings (``textualinversion``), 3 upscalers and 3 ControlNets.
    """
    models: list[dict[str, Any]] = []
    kind = ""
    for line in _TABLE.strip().splitlines():
        if line.startswith("["):
            kind = line.strip("[]")
            continue
        sd_name, name, flags, tags = line.split("|")
        model_id = 804_666 - 997 * len(models)  # sparse, descending: cursors are keys
        is_sdxl = "xl" in flags.split()
        source = next((f for f in flags.split() if f in ("training", "uploading")), "civitai")
        models.append(
            {
                "id": model_id,
                "name": name,
                "hash_sha256": hashlib.sha256(sd_name.encode()).hexdigest()[:10],
                "sd_name": sd_name,
                "type": {"name": kind, "display_name": _DISPLAY[kind]},
                "categories": [kind],
                "status": 1,
                "download_url": f"https://models.novita.emulator/{model_id}/{sd_name}",
                "download_url_ttl": 2592000,
                "tags": tags.split(","),
                "cover_url": f"https://models.novita.emulator/{model_id}/cover.jpeg",
                "source": source,
                "base_model": "SDXL 1.0" if is_sdxl else "SD 1.5",
                "base_model_type": "Inpainting" if "inpainting" in flags.split() else "Standard",
                "sd_name_in_api": sd_name if kind == "checkpoint" else sd_name.rsplit(".", 1)[0],
                "is_sdxl": is_sdxl,
                "is_nsfw": False,
                "visibility": "public" if source == "civitai" else "private",
            }
        )
    return models


def type_name(model: Mapping[str, Any]) -> str:
    kind = model.get("type")
    return str(kind.get("name", "")) if isinstance(kind, Mapping) else str(kind or "")


def encode_cursor(model_id: int) -> str:
    """Novita-style opaque cursor: ``c_`` + base64 of ``[id, "id"]``."""
    payload = json.dumps([model_id, str(model_id)], separators=(",", ":"))
    return "c_" + base64.b64encode(payload.encode()).decode()


def decode_cursor(cursor: str) -> int | None:
    """The last id of the previous page; None for "from the start"; raises ValueError."""
    if cursor in ("", "c_", "c_0"):
        return None
    try:
        if not cursor.startswith("c_"):
            raise ValueError(cursor)
        data = json.loads(base64.b64decode(cursor[2:], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid pagination.cursor") from exc
    if not (isinstance(data, list) and data and type(data[0]) is int):
        raise ValueError("invalid pagination.cursor")
    return int(data[0])


def _parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _first(query: Mapping[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[0] if values else ""


def _matcher(query: Mapping[str, list[str]]) -> Callable[[Mapping[str, Any]], bool]:
    """The ``filter.*`` query parameters as a predicate (ValueError on bad values).

    ``filter.types`` may repeat or be comma-separated; ``filter.is_inpainting``
    defaults to false as documented, so inpainting models show only when asked.
    """
    visibility = _first(query, "filter.visibility")
    source = _first(query, "filter.source")
    text = _first(query, "filter.query").lower()
    types = {
        name.strip()
        for value in query.get("filter.types", ())
        for name in value.split(",")
        if name.strip()
    }
    raw_sdxl = _first(query, "filter.is_sdxl")
    is_sdxl = _parse_bool(raw_sdxl, "filter.is_sdxl") if raw_sdxl else None
    raw_inpainting = _first(query, "filter.is_inpainting")
    inpainting = bool(raw_inpainting) and _parse_bool(raw_inpainting, "filter.is_inpainting")

    def match(model: Mapping[str, Any]) -> bool:
        if visibility and model.get("visibility", "public") != visibility:
            return False
        if source and model.get("source") != source:
            return False
        if types and type_name(model) not in types:
            return False
        if is_sdxl is not None and bool(model.get("is_sdxl")) != is_sdxl:
            return False
        if (model.get("base_model_type") == "Inpainting") != inpainting:
            return False
        if text:
            fields = [str(model.get("sd_name", "")), str(model.get("name", ""))]
            fields += [str(tag) for tag in model.get("tags") or ()]
            return any(text in field.lower() for field in fields)
        return True

    return match


class Catalogue:
    """Models ordered by descending id, paged by keyset cursor."""

    def __init__(self, models: Iterable[Mapping[str, Any]]) -> None:
        self.models = sorted((dict(model) for model in models), key=lambda m: -int(m["id"]))
        self._negative_ids = [-int(model["id"]) for model in self.models]
        if len(set(self._negative_ids)) != len(self._negative_ids):
            raise ValueError("model ids must be unique")
        self.checkpoints = frozenset(
            str(model.get("sd_name", ""))
            for model in self.models
            if type_name(model) == "checkpoint"
        )

    def page(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        """The ``GET /v3/model`` body for a parsed query string; ValueError explains a 400."""
        raw_limit = _first(query, "pagination.limit") or "100"
        if not raw_limit.isdigit() or not 0 < int(raw_limit) <= 100:
            raise ValueError("pagination.limit must be in (0, 100]")
        limit = int(raw_limit)
        after = decode_cursor(_first(query, "pagination.cursor"))
        match = _matcher(query)
        start = 0 if after is None else bisect.bisect_right(self._negative_ids, -after)
        page: list[dict[str, Any]] = []
        more = False
        for model in self.models[start:]:
            if match(model):
                if len(page) == limit:
                    more = True
                    break
                page.append(model)
        next_cursor = encode_cursor(int(page[-1]["id"])) if more else ""
        return {"models": page, "pagination": {"next_cursor": next_cursor}}
