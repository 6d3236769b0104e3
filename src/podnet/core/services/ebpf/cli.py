"""The eBPF backend as Cilium's CLI prints it: `cilium service list`, `cilium bpf lb list`,
`cilium bpf ct list global`.

Layer: core, sans-IO (text in, text out; the `podnet cilium ...` commands print these strings).
Follows cilium/cilium cilium-dbg/cmd/service_list.go (printServiceList), bpf_lb_list.go (dumpSVC,
TablePrinter), bpf_ct_list.go with pkg/maps/ctmap (CtKey4Global.Dump(reverse=true) +
CtEntry.String()), and Go's text/tabwriter as those commands configure it:
tabwriter.NewWriter(out, minwidth 5, tabwidth 0, padding 3, ' ', 0).

Rules this module keeps
- Every cell is tab-terminated, so every column — the last one too — is padded to the widest cell
  plus 3 spaces (at least 5): lines carry trailing spaces, as the real output does.
- Where Cilium iterates a Go map (random order), podnet sorts: `service list` by ID (as Cilium
  does), `bpf lb list` by frontend address, port, protocol and scope, its rows by slot; ct entries
  TCP map first, then the non-TCP map, each in insertion order.
- `bpf lb list` slot-0 rows read "0.0.0.0:0 (<revnat>) (0) [<flags>] " — with the trailing space
  the real format string leaves when there is no L7 proxy port.
"""

from __future__ import annotations

from . import lbmaps as lb
from .ct import CtEntry, CtMap, CtTuple
from .lbmaps import BackendState, Lb4Backend, Lb4Key, Lb4Service, ServiceFlags

__all__ = ["bpf_ct_list", "bpf_lb_list", "service_list", "tabwriter"]

_STATE_NAMES = {BackendState.ACTIVE: "active", BackendState.TERMINATING: "terminating",
                BackendState.QUARANTINED: "quarantined", BackendState.MAINTENANCE: "maintenance"}


def tabwriter(rows: list[list[str]], minwidth: int = 5, padding: int = 3) -> str:
    """Go's text/tabwriter for lines whose every cell ends in a tab (flags 0, padchar ' ').
    Rows must have the same number of cells (one column block, as in these listings)."""
    if not rows:
        return ""
    widths = [max(minwidth, max(len(r[i]) for r in rows) + padding) for i in range(len(rows[0]))]
    return "".join("".join(cell.ljust(w) for cell, w in zip(row, widths)) + "\n" for row in rows)


def service_list(backend) -> str:
    """`cilium service list`: one row per frontend, its backends numbered on the lines below."""
    rows = [["ID", "Frontend", "Service Type", "Backend"]]
    for rev_nat in sorted(backend.agent.by_rev_nat):
        inst = backend.agent.by_rev_nat[rev_nat]
        fe = inst.frontend
        backends = []
        for backend_id in sorted(inst.backend_ids):
            raw = backend.maps.backends.peek(lb.pack_backend_key(backend_id))
            if raw is None:
                continue
            b = Lb4Backend.unpack(raw)
            backends.append(f"{len(backends) + 1} => {b.text()} ({_STATE_NAMES.get(b.flags, 'active')})")
        svc_type = ServiceFlags(fe.flags).svc_type
        first = backends[0] if backends else ""
        rows.append([str(rev_nat), fe.text(), svc_type, first])
        rows += [["", "", "", line] for line in backends[1:]]
    return tabwriter(rows)


def _lb_rows(backend) -> list[tuple[tuple, str, list[str]]]:
    """dumpSVC: frontend text -> its entries, master first then slots."""
    backends_by_id = {lb.unpack_backend_key(k): Lb4Backend.unpack(v) for k, v in backend.maps.backends.items()}
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for raw_key, raw_value in backend.maps.services.items():
        key, value = Lb4Key.unpack(raw_key), Lb4Service.unpack(raw_value)
        sort_key = (key.address, key.dport, key.proto, key.scope)
        if key.backend_slot == 0:
            entry = f"0.0.0.0:0 ({value.rev_nat_index}) (0) [{ServiceFlags(value.flags).describe()}] "
        elif value.backend_id not in backends_by_id:
            entry = f"backend {value.backend_id} not found"
        else:
            b = backends_by_id[value.backend_id]
            entry = f"{b.text()} ({value.rev_nat_index}) ({key.backend_slot})"
        groups.setdefault(sort_key, []).append((key.backend_slot, entry))
    out = []
    for sort_key in sorted(groups):
        text = Lb4Key(sort_key[0], sort_key[1], 0, sort_key[2], sort_key[3]).frontend_text()
        out.append((sort_key, text, [e for _, e in sorted(groups[sort_key])]))
    return out


def bpf_lb_list(backend, *, revnat: bool = False, backends: bool = False) -> str:
    """`cilium bpf lb list` (default), `--revnat` or `--backends`."""
    if revnat:
        rows = [["ID", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
        for raw_key, raw_value in sorted(backend.maps.reverse_nat.items(), key=lambda kv: lb.unpack_revnat_key(kv[0])):
            value = lb.Lb4ReverseNat.unpack(raw_value)
            rows.append([str(lb.unpack_revnat_key(raw_key)), f"{lb.addr_text(value.address)}:{value.port}"])
        return tabwriter(rows)
    if backends:
        rows = [["ID", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
        for raw_key, raw_value in sorted(backend.maps.backends.items(), key=lambda kv: lb.unpack_backend_key(kv[0])):
            b = Lb4Backend.unpack(raw_value)
            rows.append([str(lb.unpack_backend_key(raw_key)),
                         f"{lb.PROTO_NAMES.get(b.proto, str(b.proto))}://{lb.addr_text(b.address)}"])
        return tabwriter(rows)
    rows = [["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
    for _, text, entries in _lb_rows(backend):
        rows += [[text if i == 0 else "", entry] for i, entry in enumerate(entries)]
    return tabwriter(rows)


def bpf_ct_list(ct: CtMap) -> str:
    """`cilium bpf ct list global`: per map (cilium_ct4_global, then cilium_ct_any4_global) each
    entry's key dump followed by its value (which ends in ' \\n'), and fmt.Println's newline."""
    out = []
    for m in (ct.tcp, ct.any):
        out.append("".join(CtTuple.unpack(k).describe() + CtEntry.unpack(v).describe() for k, v in m.items()) + "\n")
    return "".join(out)
