"""Optimizer updates in place (AdamW, SGD, one or many parameters a dispatch), gradient sums of squares, clipping."""
import math

import numpy as np

from .common import WG, _f32bits, _grid


class OptimizerOps:
    """WgpuBackend's optimizer kernels."""
    # ------------------------------------------------------------------ optimizers (in place)
    def _guard(self, guard):
        if guard is None:  # no guard: any finite one-element value passes
            if self._no_guard is None:
                self._no_guard = self.from_numpy(np.zeros(1, np.float32))
            return self._no_guard
        return guard

    def adamw_(self, p, g, m, v, lr, b1, b2, eps, wd, step, guard=None, max_norm=0.0):
        if max_norm > 0 and guard is None:
            raise ValueError("adamw_: clipping to max_norm needs the gradient norm as guard")

        n = p.size   # (not p in params: a capture keeps it for its replays, and no array may live that long)

        def params(lr, step):
            return [n] + [_f32bits(x) for x in (lr, b1, b2, eps, wd, 1 - b1 ** step, 1 - b2 ** step, max_norm)]
        if self._capture is not None:
            self._patch = lambda s: params(s["lr"], s["step"])
        self._flat("optim", "adamw_main", params(lr, step), [p, g, m, v, self._guard(guard)], p.size)

    def optimizer_slots(self):
        """Parameters one adamw_many_ dispatch updates: four bindings each, beside the params, guard and table."""
        bindings = min(self.limits.get("max-storage-buffers-per-shader-stage", 8),
                       self.limits.get("max-bindings-per-bind-group", 1000) - 1)
        return max(1, min(self.MAX_OPTIMIZER_SLOTS, (bindings - 2) // 4))

    MAX_OPTIMIZER_SLOTS = 128

    def adamw_many_(self, slots, lr, b1, b2, eps, step, guard=None, max_norm=0.0):
        """adamw_ on every (p, g, m, v, wd) of `slots` in as few dispatches as the device's bindings allow
        (optim_many.wgsl), with the same arithmetic."""
        if max_norm > 0 and guard is None:
            raise ValueError("adamw_many_: clipping to max_norm needs the gradient norm as guard")
        if len(slots) < 2:  # one parameter: the plain kernel, without a table of slots to build and upload
            return super().adamw_many_(slots, lr, b1, b2, eps, step, guard, max_norm)
        per = self.optimizer_slots()
        for start in range(0, len(slots), per):
            chunk = slots[start:start + per]
            table, rows, first = self._slot_table([(p.size, wd) for p, _, _, _, wd in chunk], WG)

            def params(lr, step, n=len(chunk)):
                return [n] + [_f32bits(x) for x in (lr, b1, b2, eps, 1 - b1 ** step, 1 - b2 ** step, max_norm)]
            if self._capture is not None:
                self._patch = lambda s, params=params: params(s["lr"], s["step"])
            arrays = [a for p, g, m, v, _ in chunk for a in (p, g, m, v)]
            self._dispatch("optim_many", "adamw_many_main", params(lr, step),
                           [self._guard(guard), table] + arrays, _grid(first), rows,
                           subs=self._optimizer_subs(len(chunk)), label=f"adamw x{len(chunk)}")

    SUMSQ_PER_WORKGROUP = WG * 16  # sumsq_many.wgsl: 256 threads x PER elements

    def sumsq_many(self, arrays):
        """sum(a * a) over all of `arrays` as a (1,) array: per-workgroup partial sums of as many arrays per
        dispatch as the device binds (sumsq_many.wgsl), then one reduction of the partials."""
        if len(arrays) < 2:  # one array: the plain kernel, without a table of slots to build and upload
            return super().sumsq_many(arrays)
        per = self.optimizer_slots() * 4   # one binding per array here
        parts = []
        for start in range(0, len(arrays), per):
            chunk = arrays[start:start + per]
            table, _, groups = self._slot_table([(a.size, 0.0) for a in chunk], self.SUMSQ_PER_WORKGROUP)
            partial = self._alloc((groups,), "float32")
            self._dispatch("sumsq_many", "sumsq_many_main", [len(chunk)], [partial, table] + list(chunk),
                           _grid(groups), sum(a.size for a in chunk), subs=self._sumsq_subs(len(chunk)),
                           label=f"sumsq x{len(chunk)}")
            parts.append(partial)
        total = parts[0] if len(parts) == 1 else self._concat_flat(parts)
        return self.reshape(self.reduce("sum", total, 0), (1,))

    def _concat_flat(self, parts):
        out = self._alloc((sum(p.size for p in parts),), "float32")
        at = 0
        for p in parts:
            self.write_view(out, at, [1], p)
            at += p.size
        return out

    def _sumsq_subs(self, n):
        """sumsq_many.wgsl's generated declarations and switch cases for n arrays."""
        key = ("sumsq", n)
        if key not in self._opt_subs:
            bindings = [f"@group(0) @binding({3 + k}) var<storage, read> G{k}: array<f32>;" for k in range(n)]
            reads = [f"        case {k}u: {{ return G{k}[i]; }}" for k in range(n)]
            self._opt_subs[key] = (("BINDINGS", "\n".join(bindings)), ("READS", "\n".join(reads)))
        return self._opt_subs[key]

    def _slot_table(self, sizes_and_decays, per_workgroup):
        """The slots' [first workgroup, elements, weight decay] table on the device (made once per layout), the
        elements in all and the workgroups in all (each workgroup taking per_workgroup elements)."""
        key = (per_workgroup,) + tuple((n, float(wd)) for n, wd in sizes_and_decays)
        hit = self._tables.get(key)
        if hit is None:
            rows, first, entries = 0, 0, []
            for n, wd in key[1:]:
                entries += [first, n, _f32bits(wd)]
                first += math.ceil(n / per_workgroup)
                rows += n
            table = self._alloc((len(entries),), "int32", upload=True)  # (not a buffer recorded work still reads)
            self.queue.write_buffer(table.buffer, 0, np.array(entries, dtype=np.uint32))
            hit = self._tables[key] = (table, rows, first)
        return hit

    def _optimizer_subs(self, n):
        """optim_many.wgsl's generated declarations and switch cases for n slots."""
        if n in self._opt_subs:
            return self._opt_subs[n]
        bindings, cases = [], []
        for k in range(n):
            for j, name in enumerate("WGMV"):
                bindings.append(f"@group(0) @binding({3 + 4 * k + j}) var<storage, read_write> {name}{k}: array<f32>;")
            cases.append(f"        case {k}u: {{ var g = G{k}[i]; if (max_norm > 0.0) {{ g = g * clip; G{k}[i] = g; }} "
                         f"let r = adamw(W{k}[i], g, M{k}[i], V{k}[i], wd); W{k}[i] = r.x; M{k}[i] = r.y; V{k}[i] = r.z; }}")
        subs = self._opt_subs[n] = (("BINDINGS", "\n".join(bindings)), ("CASES", "\n".join(cases)))
        return subs

    def sgd_(self, p, g, buf, lr, momentum, wd, guard=None, max_norm=0.0):
        if max_norm > 0 and guard is None:
            raise ValueError("sgd_: clipping to max_norm needs the gradient norm as guard")

        n = p.size   # (not p: see adamw_)

        def params(lr):
            return [n] + [_f32bits(x) for x in (lr, momentum, wd, max_norm)]
        if self._capture is not None:
            self._patch = lambda s: params(s["lr"])
        self._flat("optim", "sgd_main", params(lr), [p, g, buf, None, self._guard(guard)], p.size)

    def sumsq_into(self, a, out, slot):
        self._reduce_into("sumsq", self.reshape(a, (a.size,)), 0, out, slot)

    def clip_(self, g, normsq, max_norm):
        self._flat("optim", "clip_main", [g.size, _f32bits(max_norm)], [g, normsq], g.size)
