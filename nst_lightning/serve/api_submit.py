"""The API's routes that make jobs: what a job may choose (``/api/options``) and a new job (``POST /api/jobs``)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from nst_lightning.serve import jobs, settings
from nst_lightning.serve.deps import MAX_STYLES, ApiError, Server, check_token, server
from nst_lightning.serve.uploads import display_name, save_upload
from nst_lightning.serve.weights import check_choice

router = APIRouter(prefix="/api", dependencies=[Depends(check_token)])


def defaults() -> dict[str, Any]:
    """The command line's defaults of the settings the page shows (from the classes' signatures)."""
    from nst_lightning.cli.fit import TRAINER_DEFAULTS
    from nst_lightning.run.data import StyleTransferDataModule
    from nst_lightning.run.module import StyleTransfer

    model = inspect.signature(StyleTransfer.__init__).parameters
    data = inspect.signature(StyleTransferDataModule.__init__).parameters
    return {
        "data.image_size": data["image_size"].default,
        "trainer.max_steps": TRAINER_DEFAULTS["trainer.max_steps"],
        "model.style_weight": model["style_weight"].default,
        "model.preserve_color": model["preserve_color"].default,
        "model.backbone": model["backbone"].default,
        "model.weights": model["weights"].default,
    }


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


@router.get("/options")
def options(state: Server = Depends(server)) -> dict[str, Any]:
    """What a job may choose: backbones, weights, colour preservation, and the defaults."""
    from nst_lightning.core.backbones import BACKBONES
    from nst_lightning.names import PreserveColor

    return {
        "backbones": list(BACKBONES),
        "weights": list(state.weights),
        "weights_backbones": state.offer.backbones,  # the backbones each loads with: the page picks the first
        "preserve_color": list(PreserveColor.__args__),
        "defaults": defaults(),
        "max_upload_mb": state.max_upload_mb,
        "max_styles": MAX_STYLES,
    }


@router.post("/jobs", status_code=201)
async def create_job(
    request: Request,
    content: UploadFile = File(..., description="the content image"),
    style: list[UploadFile] = File(..., description="one or more style images"),
    settings_json: str | None = Form(None, alias="settings", description="config keys as JSON"),
    state: Server = Depends(server),
) -> dict[str, str]:
    """Queues a job: the content image, one or more style images, and settings as config keys."""
    if len(style) > MAX_STYLES:
        raise ApiError(422, f"{len(style)} style images: send at most {MAX_STYLES}", "style")
    try:
        parse = {"parse_constant": _refuse_constant, "object_pairs_hook": settings.JsonObject}
        chosen = json.loads(settings_json, **parse) if settings_json else {}
        chosen = settings.without_empty(chosen)  # an empty field means the default
    except settings.SettingsError as err:  # a key given twice
        raise ApiError(422, str(err), err.key) from None
    except ValueError as err:
        raise ApiError(422, f"settings is not valid JSON ({err}): send an object of config keys", "settings") from None
    try:
        arguments = settings.settings_arguments(chosen, state.weights)
        check_choice(chosen, state.offer, given_only=True)  # before validate, which would name the server's file
    except settings.SettingsError as err:
        raise ApiError(422, str(err), err.key) from None
    store = state.store
    job_id = jobs.new_job_id()
    folder = store.folder(job_id)
    folder.mkdir(parents=True)
    decodes, draft = request.app.state.decodes, settings.longest_side(chosen)
    try:
        content_path = await save_upload(content, folder / "content", "content", state.limit, decodes, draft)
        styles = []
        for index, upload in enumerate(style):
            label = f"style {index + 1} ({display_name(upload.filename)})"
            styles.append(await save_upload(upload, folder / f"style_{index}", label, state.limit, decodes, draft))
        fit = settings.fit_arguments(folder, content_path, styles, arguments, state.preview_every)
        own = settings.fit_arguments(folder, content_path, styles, [], state.preview_every)
        from nst_lightning.cli.fit import zero_weight_note  # loaded by validate's parse already

        try:
            parsed = await run_in_threadpool(settings.validate, fit, own, state.weights)
            check_choice(chosen, state.offer)  # the weights a job left out (imagenet) must be offered too
        except settings.SettingsError as err:
            raise ApiError(422, state.scrubber.scrub(str(err), folder), err.key) from None
        names = {
            "content": display_name(content.filename),
            "styles": [display_name(upload.filename) for upload in style],
            "files": {"content": content_path.name, "styles": [path.name for path in styles]},
        }
        shown = {
            **settings.flatten(chosen),
            "data.image_size": parsed["data"]["image_size"],
            "trainer.max_steps": parsed["max_steps"],
        }
        for key in ("style_weight", "preserve_color", "backbone", "weights"):
            shown.setdefault(f"model.{key}", parsed["model"][key])
        if shown["model.weights"] not in state.weights:  # a file of the server's: shown by its name
            shown["model.weights"] = Path(str(shown["model.weights"])).name
        note = zero_weight_note(parsed["model"]["content_weight"], parsed["model"]["style_weight"])
        store.add(job_id, fit, shown, names, parsed["max_steps"], note=note)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"id": job_id}
