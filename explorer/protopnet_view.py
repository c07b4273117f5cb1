"""The class view of a ProtoPNet baseline entry (kind ``"protopnet"``), in the same :class:`~explorer.data.ClassView`
shape as phpn's, so that the class page, its figures and ``/compare`` show both side by side:

- prototypes: class c's m prototypes; ``alpha`` = their last-layer weights to class c (ProtoPNet's logit is
  ``sum_j w[c, j] * sim_j``), signs +1, norms of the prototype vectors;
- where: each prototype's similarity map ``log((d + 1) / (d + 1e-4))`` on the class's test images (the maps
  ProtoEval scores), computed by the rebuilt network (its trunk is fine-tuned, so no stored features apply);
- what: the training patch each prototype was pushed onto (one per prototype: ProtoPNet's own gallery);
- why: ``w[c, j] * max_hw sim_j`` per own-class prototype; the other classes' prototypes give the rest of the logit.
"""

from __future__ import annotations

from typing import Any

import torch

from explorer.views import ClassView

__all__ = ["protopnet_class_view", "protopnet_network"]


def protopnet_network(data: Any, entry_id: str):
    """``(model, push)`` of a ProtoPNet entry, rebuilt once per version: the trunk's architecture from the entry's
    model record (weights replaced by the stored, fine-tuned ones)."""
    info = data.info(entry_id)

    def build():
        from phpn_core.models.spec import ModelSpec, build_model
        from phpn_core.models.split import split_classifier
        from phpn_core.protopnet.entry import rebuild_protopnet

        tensors, _ = data.registry.load_protopnet_tensors(entry_id)
        meta = info.metadata or {}
        rec = meta.get("model_record") or {}
        spec = ModelSpec(arch=rec.get("arch", info.model.removeprefix("protopnet-")), checkpoint=None, weights=None,
                         num_classes=rec.get("num_classes", info.n_classes), input_size=rec.get("input_size"))
        trunk, _, _ = split_classifier(build_model(spec).eval())  # architecture only: the entry holds the weights
        return rebuild_protopnet(trunk, tensors, meta.get("protopnet") or {})

    return data.cached_model(("protopnet", entry_id, info.version), build)


def protopnet_class_view(data: Any, entry_id: str, c: int) -> ClassView:
    """Class ``c``'s :class:`ClassView` for a ProtoPNet entry (see the module docstring)."""
    from phpn_core.data.base import normalize
    from phpn_core.protopnet.maps import own_class_maps

    names = data.class_names(entry_id)
    model, push = protopnet_network(data, entry_id)
    idx = model.prototypes_of_class(c)
    m = int(idx.numel())
    protos = model.prototypes.detach()[idx, :, 0, 0].float()
    weights = model.last_layer.weight.detach()[c, idx].float()
    notes = [f"ProtoPNet baseline: {m} prototypes of class {c}; alpha is each prototype's last-layer weight to the "
             "class; contributions are weight x similarity; the other classes' prototypes give the rest of the logit."]
    test_ids: list[str] = []
    logits, contributions, oriented, preds, images = torch.zeros(0), torch.zeros(0, m), torch.zeros(0, m, 1, 1), [], None
    ds = data.dataset(entry_id, "test")
    if ds is None:
        notes.append(f"No heatmaps: {data.why_missing(entry_id, 'dataset', 'test')}.")
    else:
        chosen = [i for i, y in enumerate(ds.labels) if int(y) == c][: data.images_per_class]
        if not chosen:
            notes.append("The test set has no images of this class.")
        else:
            items = [ds[i] for i in chosen]
            images = torch.stack([it["image"].float() for it in items])
            x = normalize(images, ds.mean, ds.std)
            with torch.inference_mode():
                all_logits = model(x)
                oriented = own_class_maps(model, x, c).float()  # [n, m, h, w]
            contributions = oriented.amax(dim=(2, 3)) * weights  # [n, m]
            logits, preds = all_logits[:, c].float(), all_logits.argmax(1).tolist()
            test_ids = [str(it["image_id"]) for it in items]
    gallery: list[list[tuple[str, float, torch.Tensor | None]]] = [[] for _ in range(m)]
    train = data.dataset(entry_id, "train")
    if train is None:
        notes.append(f"No gallery: {data.why_missing(entry_id, 'dataset', 'train')}.")
    else:
        from phpn_core.report.gallery import crop, default_patch_size

        h, w = push.feature_size
        for j, p in enumerate(idx.tolist()):
            item = train[int(push.image_index[p])]
            img = item["image"].float()
            S = img.shape[-1]
            cy, cx = ((float(push.cell[p, 0]) + 0.5) * S / max(h, 1), (float(push.cell[p, 1]) + 0.5) * S / max(w, 1))
            gallery[j] = [(str(item["image_id"]), float(push.distance[p]), crop(img, cy, cx, default_patch_size(S)))]
        notes.append("Gallery: the training patch each prototype was pushed onto (score: its squared distance to the "
                     "prototype before the push).")
    return ClassView(entry_id=entry_id, c=c, name=names[c], bias=0.0, alpha=weights, signs=torch.ones(m),
                     norms=protos.norm(dim=1), rel_error=None, test_ids=test_ids, test_logits=logits, test_pred=preds,
                     contributions=contributions, oriented=oriented, test_images=images, gallery=gallery, notes=notes,
                     kind="protopnet")
