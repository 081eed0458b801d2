"""Read a replay's counts and name the producer: the first module whose non-finite values reach the loss or the
gradients, in the order the values flowed (input, forward, loss, backward).

Which non-finite values count: a forward value is blamed only if it reaches the model's outputs as NaN, or as
+Inf with a non-finite gradient arriving there; -Inf at the outputs (masked logits) and non-finite values the
forward absorbed (an additive -Inf attention mask before a softmax, NaN-coded inputs cleaned by nan_to_num) are
not, unless the backward shows them reaching a gradient. A NaN made from an Inf is traced back to where the +Inf
started (an exp overflowing, then inf / inf); -Inf is taken for a mask there.
"""

import math

from .report import make_report

NAN, POSINF, NEGINF = 0, 1, 2
ANY = (NAN, POSINF, NEGINF)


def _bad(values, slots, kinds=ANY):
    return [s for s in slots if any(values[s][k] > 0 for k in kinds)]


def _count(values, slot):
    return sum(values[slot][:3])


def _is_inside(name, ancestor):
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _input_report(step, replay, values, kinds, detail=""):
    for slot, rows_slot in replay.inputs:
        if _bad(values, [slot], kinds):
            rows = None if rows_slot is None else [i for i, bad in enumerate(values[rows_slot]) if bad]
            return make_report(step, "input", "bad input data", "", replay.slots.labels[slot], _count(values, slot),
                               detail, rows=rows, call=replay.call,
                               sample_dim=replay.sample_dim)
    return None


def _producers(forward, values, kinds, end=None):
    """Indices of the module calls (completion order) whose outputs hold `kinds` and inputs do not."""
    return [i for i, (_, ins, outs) in enumerate(forward[:end])
            if not _bad(values, ins, kinds) and _bad(values, outs, kinds)]


def _inf_origin(forward, values, index):
    """Where the Inf that module call `index` turned into NaN started: the latest earlier call that made an Inf of
    that sign from inputs without one, else the innermost enclosing call whose own code made it (None if the Inf
    came from outside every module: the model's inputs)."""
    name, ins, _ = forward[index]
    kinds = (POSINF,) if _bad(values, ins, (POSINF,)) else (NEGINF,)
    earlier = _producers(forward, values, kinds, index)
    if earlier:  # the latest, or the innermost module inside it that made it (children complete first)
        outer = forward[earlier[-1]][0]
        return next(i for i in earlier if _is_inside(forward[i][0], outer)), kinds
    for later, (outer, outer_ins, _) in enumerate(forward[index + 1:], index + 1):
        if _is_inside(name, outer) and not _bad(values, outer_ins, kinds):
            return later, kinds
    return None


def _forward_report(step, replay, values, kinds):
    """The forward producer, else the input, of the `kinds` of non-finite values that reached the model's
    outputs. A module making them from clean inputs is preferred to a non-finite input, which the model may
    have cleaned (a NaN-coded missing value under nan_to_num)."""
    forward = replay.forward
    found = _producers(forward, values, kinds)
    if not found:
        return _input_report(step, replay, values, kinds)
    index = found[0]
    if kinds == (NAN,) and _bad(values, forward[index][1], (POSINF, NEGINF)):  # NaN made from an Inf
        origin = _inf_origin(forward, values, index)
        if origin is None:
            found = _input_report(step, replay, values, (POSINF, NEGINF), " (an Inf in the batch became NaN)")
            if found is not None:
                return found
        else:
            index, kinds = origin
    name, _, outs = forward[index]
    slot = (_bad(values, outs, kinds) or _bad(values, outs))[0]
    later = [n for n, _, o in forward[index + 1:] if _bad(values, o) and not _is_inside(name, n)]
    corrupt = [(label, int(_count(values, s))) for s, label in replay.param_values.get(name, []) if _bad(values, [s])]
    detail = "".join(f" (its parameter `{label}` already holds {count} NaN/Inf values: the weights were corrupt "
                     "before this step, loaded so or changed outside the guard)" for label, count in corrupt[:1])
    return make_report(step, "forward", "unstable activation", name, replay.slots.labels[slot], _count(values, slot),
                       detail, passed_on=list(dict.fromkeys(later)), call=replay.call)


def _backward_producer(replay, values):
    """(module, slot, label) where the backward first turned finite gradients into non-finite ones: descend from
    the model's call through the module calls made inside it, into a call that received finite gradients at its
    outputs and holds non-finite ones (at its inputs, inside it, or in the parameters of the modules it ran);
    where no inner call does, that call's own code made them. None if every gradient was finite. Calls, not
    modules: a cell called in a loop passes a gradient it made in one call on to its earlier calls."""
    calls = replay.calls
    if not calls:
        return None
    grads = [{"in": [], "out": []} for _ in calls]
    for order, call, side, slot in replay.backward:
        grads[call][side].append((order, slot))
    children = [[] for _ in calls]
    for call, (_, parent) in enumerate(calls):
        if parent is not None:
            children[parent].append(call)
    subtree = [[call] for call in range(len(calls))]
    for call in reversed(range(len(calls))):  # a call starts after the call it was made in
        if calls[call][1] is not None:
            subtree[calls[call][1]] += subtree[call]

    def params_inside(call):
        return [s for owner, own in replay.params.items() if _is_inside(owner, calls[call][0]) for s, _ in own]

    def bad_orders(call):  # when its (or an inner call's) non-finite gradients fired; parameters last
        orders = [o for c in subtree[call] for o, s in grads[c]["in"] + grads[c]["out"] if _bad(values, [s])]
        return orders + [math.inf] * len(_bad(values, params_inside(call)))

    def received(call):
        return _bad(values, [s for _, s in grads[call]["out"]])

    if not bad_orders(0):
        return None
    current = 0
    while True:
        candidates = [c for c in children[current] if not received(c) and bad_orders(c)]
        if not candidates:
            break
        current = min(candidates, key=lambda c: min(bad_orders(c)))
    name = calls[current][0]
    inner = {calls[c][0] for c in children[current]}  # own parameters: of no module it called (F.linear on a weight)
    own = [s for _, s in sorted(grads[current]["in"])] + [
        s for owner, params in replay.params.items() for s, _ in params
        if _is_inside(owner, name) and not any(_is_inside(owner, c) for c in inner)]
    if _bad(values, own):
        slot = _bad(values, own)[0]
        return name, slot, replay.slots.labels[slot]
    child = min((c for c in children[current] if received(c)), key=lambda c: min(bad_orders(c)))
    slot = _bad(values, [s for _, s in sorted(grads[child]["out"])])[0]
    return name, slot, f"gradient it passed to `{calls[child][0]}`"


def nonfinite_report(step, replay, values, scale=None):
    """NanReport for a step whose gradients were non-finite, from its replay and the slots' values. `scale`: the
    GradScaler's scale of that step (None without one)."""
    return _loss_in_forward(step, replay, values, _nonfinite_report(step, replay, values, scale))


def _nonfinite_report(step, replay, values, scale):
    if _bad(values, replay.outputs, (NAN,)):
        found = _forward_report(step, replay, values, (NAN,))
        if found is not None:
            return found
    if _bad(values, replay.outputs, (POSINF,)) and _bad(values, replay.output_grads):
        found = _forward_report(step, replay, values, (POSINF,))
        if found is not None:
            return found
    overflow = scale is not None and scale > 1.0  # at a scale <= 1 the loss scaling did not make the overflow
    detail = f" (scale {scale:g})" if overflow else ""
    cause = "loss-scale overflow" if overflow else None
    if _bad(values, replay.output_grads):
        index = next(i for i, slot in enumerate(replay.output_grads) if _bad(values, [slot]))
        slot, rows_slot = replay.output_grads[index], replay.output_grad_rows[index]
        rows = None if rows_slot is None else [i for i, bad in enumerate(values[rows_slot]) if bad]
        return make_report(step, "loss", cause or "unstable loss", "", replay.slots.labels[slot],
                           _count(values, slot), detail, call=replay.call, rows=rows, sample_dim=replay.sample_dim)
    found = _backward_producer(replay, values)
    if found is not None:
        name, slot, label = found
        absorbed = _absorbed(step, replay, values, name, label.endswith(".grad"))
        if absorbed is not None:
            return absorbed
        return make_report(step, "backward", cause or "exploding gradients", name, label, _count(values, slot), detail,
                           call=replay.call)
    if replay.error:  # say so rather than name a module or cause from a replay that did not finish
        return make_report(step, None, "could not localise", None, None, 0, f": {replay.error}", call=replay.call)
    return make_report(step, None, "not reproduced", None, None, 0, call=replay.call)


def _loss_in_forward(step, replay, values, found):
    """A loss the model's own forward code computed (a 0-dim output, as a Hugging Face model given labels= returns)
    that went non-finite while every tensor output stayed finite is an unstable loss, not an activation."""
    bad = _bad(values, replay.outputs)
    if (found.phase != "forward" or found.module != "" or not bad or any(s not in replay.scalar_outputs for s in bad)
            or _bad(values, [s for s in replay.outputs if s not in replay.scalar_outputs] + replay.other_outputs)):
        return found
    return make_report(step, "loss", "unstable loss", "", replay.slots.labels[bad[0]], _count(values, bad[0]),
                       " (a loss the model's forward computed: a 0-dim output)", call=replay.call)


def _absorbed(step, replay, values, name, parameter):
    """A non-finite forward value the forward absorbed but the backward did not (a NaN input masked out after a
    Linear still makes its weight gradient NaN): blame where that value came from, not the backward. -Inf is
    taken for a mask (an additive attention mask among the inputs), unless the non-finite gradient is of a
    `parameter` of that module: an input a weight multiplies (a Linear's) makes its gradient non-finite."""
    kinds = (NAN, POSINF, NEGINF) if parameter else (NAN, POSINF)
    if not any(_bad(values, ins, kinds) for n, ins, _ in replay.forward if n == name):
        return None
    detail = f" (the forward absorbed it, but it reached the gradients in `{name or 'the model'}`)"
    reported = _input_report(step, replay, values, kinds, detail)
    if reported is not None:
        return reported
    found = _producers(replay.forward, values, kinds)
    if not found:
        return None
    index = found[0]
    producer, _, outs = replay.forward[index]
    slot = _bad(values, outs, kinds)[0]
    return make_report(step, "forward", "unstable activation", producer, replay.slots.labels[slot],
                       _count(values, slot), detail, call=replay.call)


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
    return make_report(step, "backward", "exploding gradients", owner, f"{leaf}.grad", 0, detail, numbers=numbers,
                       call=replay.call)
