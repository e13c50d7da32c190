"""Locust load test: users posting a real 640x480 JPEG to /predict, as multipart and raw body.

    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

Set BATCHD_LOCUST_IMAGE to post your own image instead of the generated photo.
"""

from __future__ import annotations

import os
from pathlib import Path

from locust import FastHttpUser, between, task

from loadtest.images import photo_jpeg

IMAGE = (Path(os.environ["BATCHD_LOCUST_IMAGE"]).read_bytes()
         if os.environ.get("BATCHD_LOCUST_IMAGE") else photo_jpeg())


class PredictUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def check(self, response) -> None:  # type: ignore[no-untyped-def]
        if response.status_code != 200:
            response.failure(f"status {response.status_code}: {response.text[:200]}")
            return
        predictions = response.json().get("predictions") or []
        if not predictions or not 0.0 <= predictions[0]["prob"] <= 1.0:
            response.failure(f"malformed answer: {response.text[:200]}")

    @task(3)
    def raw_body(self) -> None:
        with self.client.post("/predict", data=IMAGE, headers={"content-type": "image/jpeg"},
                              name="/predict (raw)", catch_response=True) as response:
            self.check(response)

    @task(1)
    def multipart(self) -> None:
        with self.client.post("/predict", files={"file": ("photo.jpg", IMAGE, "image/jpeg")},
                              name="/predict (multipart)", catch_response=True) as response:
            self.check(response)
