"""A checkpoint carries the digest of its own contents: a file whose bytes were changed after it was
written (a bad copy, a disk error, an edit) is refused by every loader instead of being trained on,
exported or evaluated. Checkpoints written before digests existed load as before."""
from __future__ import annotations

from dynammo.distributed import state_digest
from dynammo.errors import UserError

DIGEST_KEY = "digest"


def sealed(state: dict) -> dict:
    """The state with the sha256 of everything in it (tensors' bytes, numbers, names) added."""
    return {**state, DIGEST_KEY: state_digest(state)}


def check_seal(state: dict, path) -> None:
    """Refuse a state whose contents no longer match its digest (none stored: an older checkpoint)."""
    stored = state.get(DIGEST_KEY)
    if stored is None:
        return
    if stored != state_digest({k: v for k, v in state.items() if k != DIGEST_KEY}):
        raise UserError(f"checkpoint {path} was altered after it was written (its contents do not match the digest "
                        "stored in it); restore the file or use an earlier task's checkpoint")
