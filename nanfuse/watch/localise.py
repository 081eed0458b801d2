"""Read a replay's counts and name the producer: the first module that turned finite values into non-finite
ones, in the order the values flowed (input, forward, loss, backward)."""

from .report import make_report


def _bad(values, slots):
    return [s for s in slots if values[s][0] > 0]


def _is_inside(name, ancestor):
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def nonfinite_report(step, replay, values):
    """NanReport for a step whose gradients were non-finite, from its replay and the slots' values."""
    labels = replay.slots.labels
    for slot, rows_slot in replay.inputs:
        if values[slot][0] > 0:
            rows = None if rows_slot is None else [i for i, bad in enumerate(values[rows_slot]) if bad]
            return make_report(step, "input", "bad input data", "", labels[slot], values[slot][0], rows=rows)
    for i, (name, ins, outs) in enumerate(replay.forward):
        if not _bad(values, ins) and _bad(values, outs):
            slot = _bad(values, outs)[0]
            later = [n for n, _, o in replay.forward[i + 1:] if _bad(values, o) and not _is_inside(name, n)]
            return make_report(step, "forward", "unstable activation", name, labels[slot], values[slot][0],
                               passed_on=list(dict.fromkeys(later)))
    if _bad(values, replay.output_grads):
        slot = _bad(values, replay.output_grads)[0]
        return make_report(step, "loss", "unstable loss", "", labels[slot], values[slot][0])
    for name, outs, ins in replay.backward:
        own = [s for s, _ in replay.params.get(name, [])]
        if not _bad(values, outs) and _bad(values, ins + own):
            slot = _bad(values, ins + own)[0]
            return make_report(step, "backward", "exploding gradients", name, labels[slot], values[slot][0])
    for name, own in replay.params.items():  # a gradient made outside any hooked module's backward
        if _bad(values, [s for s, _ in own]):
            slot = _bad(values, [s for s, _ in own])[0]
            return make_report(step, "backward", "exploding gradients", name, labels[slot], values[slot][0])
    detail = f" (the replay raised {replay.error})" if replay.error else ""
    return make_report(step, None, "not reproduced", None, None, 0, detail)


def jump_report(step, replay, values, norm, median, factor):
    """NanReport for a finite gradient norm that jumped past `factor` times its recent median."""
    numbers = dict(norm=norm, median=median, ratio=norm / median, factor=factor)
    detail = f": the gradient norm {norm:.4g} is {norm / median:.4g}x its recent median {median:.4g}"
    norms = [(values[slot][0], name) for slot, name in (replay.norms if replay is not None else [])]
    if not norms:
        return make_report(step, "backward", "exploding gradients", None, None, 0, detail, numbers=numbers)
    top, name = max(norms)
    total = sum(n * n for n, _ in norms) ** 0.5
    owner, _, leaf = name.rpartition(".")
    numbers.update(largest=name, share=top / total if total else 0.0)
    detail += f"; {name} holds {top / total:.0%} of it" if total else ""
    return make_report(step, "backward", "exploding gradients", owner, f"{leaf}.grad", 0, detail, numbers=numbers)
