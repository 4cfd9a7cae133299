"""A client of the AUTOMATIC1111 web UI API, written from that API's public documentation (its
/docs page and wiki "API" article), the way scripts and tools use it: JSON in, base64 PNGs out, `info`
a JSON string. Nothing in it knows about streamcanvas."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
from PIL import Image


class A1111Client:
    def __init__(self, base_url: str, timeout: float = 120.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def txt2img(self, **payload: Any) -> dict[str, Any]:
        response = self.http.post("/sdapi/v1/txt2img", json=payload)
        response.raise_for_status()
        return self._decoded(response.json())

    def img2img(self, init_image: Image.Image, **payload: Any) -> dict[str, Any]:
        buffer = io.BytesIO()
        init_image.save(buffer, format="PNG")
        payload["init_images"] = [base64.b64encode(buffer.getvalue()).decode()]
        response = self.http.post("/sdapi/v1/img2img", json=payload)
        response.raise_for_status()
        return self._decoded(response.json())

    @staticmethod
    def _decoded(body: dict[str, Any]) -> dict[str, Any]:
        images = [Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1]))) for data in body["images"]]
        return {"images": images, "parameters": body["parameters"], "info": json.loads(body["info"])}

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        response = self.http.get("/sdapi/v1/progress", params={"skip_current_image": str(skip_current_image).lower()})
        response.raise_for_status()
        return response.json()

    def interrupt(self) -> None:
        self.http.post("/sdapi/v1/interrupt").raise_for_status()

    def options(self) -> dict[str, Any]:
        response = self.http.get("/sdapi/v1/options")
        response.raise_for_status()
        return response.json()

    def set_options(self, **options: Any) -> None:
        self.http.post("/sdapi/v1/options", json=options).raise_for_status()

    def sd_models(self) -> list[dict[str, Any]]:
        response = self.http.get("/sdapi/v1/sd-models")
        response.raise_for_status()
        return response.json()

    def samplers(self) -> list[dict[str, Any]]:
        response = self.http.get("/sdapi/v1/samplers")
        response.raise_for_status()
        return response.json()
