"""Each Service backend seen the way its real tool shows it: `podnet cilium …` for the eBPF backend,
`podnet ipvsadm …` for the IPVS one. Live (the running lab, over the control socket) or offline
from manifests with -f, like `podnet iptables-save`.

Layer: lab (the user's edge). The text comes from each backend's own formatters; this module only
picks the view, and says clearly when the node runs a different backend than the tool asked about.
"""

from __future__ import annotations

from podnet.cli_services import _emit, _offline_node, _state_dir, add_node_choice, add_node_options, live_fields
from podnet.control import request
from podnet.errors import ConfigError


def backend_view(backend, view: str, options: dict) -> str:
    """The text of one view of `backend` (VIEW_BACKEND says which backend has which view).
    `options["now"]` is the node's clock for views that show ages or rates."""
    wanted = VIEW_BACKEND[view]
    if backend.name != wanted:
        raise ConfigError(f"the node's Service backend is {backend.name}; `{TOOL[wanted]} {view}` shows the "
                          f"{wanted} backend (podnet backend set {wanted}, or -f … --backend {wanted})")
    if wanted == "ebpf":
        from podnet.core.services.ebpf import cli as cilium
        if view == "service list":
            return cilium.service_list(backend)
        if view == "bpf lb list":
            return cilium.bpf_lb_list(backend, revnat=bool(options.get("revnat")),
                                      backends=bool(options.get("backends")))
        return cilium.bpf_ct_list(backend.ct)
    now = float(options.get("now", 0.0))
    return backend.ipvsadm(now, connections=view == "-Lnc", stats=bool(options.get("stats")),
                           rate=bool(options.get("rate")))


VIEW_BACKEND = {"service list": "ebpf", "bpf lb list": "ebpf", "bpf ct list global": "ebpf",
                "-Ln": "ipvs", "-Lnc": "ipvs"}
TOOL = {"ebpf": "cilium", "ipvs": "ipvsadm"}


def _show(args, view: str, options: dict) -> int:
    node = _offline_node(args, f"{TOOL[VIEW_BACKEND[view]]} {view}")
    if node is not None:
        text = backend_view(node.backend, view, options)
    else:
        text = request(_state_dir(args), "backend-view", view=view, options=options, **live_fields(args))["text"]
    return _emit(text if text.endswith("\n") else text + "\n")


def cmd_cilium(args) -> int:
    words = args.words
    if words == ["service", "list"]:
        return _show(args, "service list", {})
    if words == ["bpf", "lb", "list"]:
        return _show(args, "bpf lb list", {"revnat": args.revnat, "backends": args.backends})
    if words in (["bpf", "ct", "list", "global"], ["bpf", "ct", "list"]):
        return _show(args, "bpf ct list global", {})
    raise ConfigError(f"podnet cilium: unknown command {' '.join(words)!r} (podnet knows `service list`, "
                      "`bpf lb list [--revnat|--backends]`, `bpf ct list global`)")


def cmd_ipvsadm(args) -> int:
    if not args.list:
        raise ConfigError("podnet ipvsadm: only listing (-L / -l) is supported; the virtual services are kube-proxy's")
    return _show(args, "-Lnc" if args.connection else "-Ln", {"stats": args.stats, "rate": args.rate})


def register(sub) -> None:
    cil = sub.add_parser("cilium", help="the eBPF backend as the cilium CLI shows it",
                         usage="podnet cilium service list | bpf lb list [--revnat|--backends] | "
                               "bpf ct list global   [-f FILE... | --node NAME]")
    cil.add_argument("words", nargs="+")
    cil.add_argument("--revnat", action="store_true", help="bpf lb list: the reverse NAT map")
    cil.add_argument("--backends", action="store_true", help="bpf lb list: the backends map")
    cil.add_argument("-f", "--file", action="append", help="manifest file (repeatable): offline")
    add_node_options(cil, offline=True)
    add_node_choice(cil)
    cil.set_defaults(func=cmd_cilium)

    ipv = sub.add_parser("ipvsadm", help="the IPVS backend as ipvsadm shows it",
                         usage="podnet ipvsadm -Ln [--stats|--rate] | -Lnc   [-f FILE... | --node NAME]")
    ipv.add_argument("-L", "-l", "--list", dest="list", action="store_true")
    ipv.add_argument("-n", "--numeric", action="store_true", help="(always numeric)")
    ipv.add_argument("-c", "--connection", action="store_true", help="the connection table")
    ipv.add_argument("--stats", action="store_true")
    ipv.add_argument("--rate", action="store_true")
    ipv.add_argument("-f", "--file", action="append", help="manifest file (repeatable): offline")
    add_node_options(ipv, offline=True)
    add_node_choice(ipv)
    ipv.set_defaults(func=cmd_ipvsadm)
