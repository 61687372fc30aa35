"""`tessera embed RUN_DIR --text T --image PATH`: L2-normalised embeddings of texts and images from a dual encoder."""

from __future__ import annotations

import json

from infra.commands.arguments import add_trained_run_arguments
from train.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed texts and images with a trained dual encoder (model.clip): JSON or .npy",
        description="Each --text is tokenized as training captions are (the end token last) and each --image is "
        "resized to the model's image size; the embeddings are L2-normalised, so dot products are cosine "
        "similarities. Prints a table of text-image similarities, or --json, or writes --out FILE.npy (texts' rows "
        "first, then images').",
    )
    add_trained_run_arguments(p)
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeat for more)")
    p.add_argument("--image", action="append", default=[], help="an image file to embed (repeat for more)")
    p.add_argument("--json", action="store_true", help="print {texts: [{text, embedding}], images: [...]} as JSON")
    p.add_argument("--out", help="write the embeddings to this .npy file ([texts + images, embed_dim])")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import jax
    import numpy as np

    from infra.runtime import open_trained_run
    from train.data.image_text import image_problem, open_image
    from train.embedding_eval import EmbeddingScorer
    from train.inference import run_config

    if not args.text and not args.image:
        raise ConfigError("give at least one --text or --image to embed")
    if args.out is not None and not args.out.endswith(".npy"):
        raise ConfigError(f"--out {args.out} must name a .npy file")
    if run_config(args.run_dir).model.clip is None:
        raise ConfigError(f"{args.run_dir} is not a dual encoder (model.clip); tessera embed needs one")
    for image in args.image:
        problem = image_problem(Path(image))
        if problem:
            raise ConfigError(f"--image {image}: {problem.replace('_', ' ')}")
    run, mesh, rules = open_trained_run(args.run_dir, args.overrides, dual_encoder=True)
    cfg, vision = run.cfg, run.cfg.model.clip.vision
    scorer = EmbeddingScorer(run.model.graphdef, jax.tree.map(lambda a: a.sharding, run.params), mesh, rules,
                             cfg.data.batch_size, run.tokenizer, cfg.data.seq_len)
    texts = scorer.embed_texts(run.params, args.text) if args.text else np.zeros((0, cfg.model.clip.embed_dim))
    pixels = np.stack([open_image(Path(p), vision.image_size, vision.channels) for p in args.image]) if args.image \
        else None
    images = scorer.embed_images(run.params, pixels) if pixels is not None else np.zeros((0, cfg.model.clip.embed_dim))
    if args.out:
        np.save(args.out, np.concatenate([texts, images]).astype(np.float32))
        print(f"wrote {len(texts) + len(images)} embeddings ({len(texts)} texts, then {len(images)} images) of width "
              f"{texts.shape[1] if len(texts) else images.shape[1]} to {args.out}")
    elif args.json:
        print(json.dumps({
            "run_dir": str(run.run_dir), "step": run.step,
            "texts": [{"text": t, "embedding": e.tolist()} for t, e in zip(args.text, texts, strict=True)],
            "images": [{"image": i, "embedding": e.tolist()} for i, e in zip(args.image, images, strict=True)],
        }))
    else:
        print(f"cosine similarities ({run.run_dir} at step {run.step}):")
        for text, t in zip(args.text, texts, strict=True):
            cells = ", ".join(f"{image}: {float(t @ i):+.3f}" for image, i in zip(args.image, images, strict=True))
            print(f"  {text!r}" + (f" -> {cells}" if cells else f": embedded ({len(t)} values)"))
        if not args.text:
            print(f"  {len(images)} images embedded ({images.shape[1]} values each); add --text to compare")
    return 0
