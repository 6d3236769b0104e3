"""`iptables -L` output (core layer): the same columns, widths and number abbreviations as iptables
1.8.9 prints with -n, -v, -x and --line-numbers.

    Chain KUBE-SVC-X (1 references)
     pkts bytes target     prot opt in     out     source               destination
        0     0 KUBE-MARK-MASQ  17   --  *      *      !10.244.0.0/16        10.96.0.10  /* ... */ udp dpt:53

Without numeric=True the protocol is named (`all`, `tcp`), 0.0.0.0/0 is `anywhere` and a missing
interface `any`, as iptables prints them; ports stay numbers (iptables would print /etc/services names,
and the core reads no files) and addresses are never resolved.
"""

from __future__ import annotations

from collections import Counter

from .rules import Chain, Rule, Table, format_ipv4, list_mask, protocol_name

U64 = 1 << 64


def format_number(number: int, *, exact: bool = False, table: bool = True) -> str:
    """xtables_print_num: numbers past 99999 are shown in K/M/G/T (rounded), right-aligned in
    5 columns; -x prints them whole in 8. `table=False` is the policy line's form (no padding)."""
    if exact:
        return f"{number:8d} " if table else f"{number} "
    if number <= 99999:
        return f"{number:5d} " if table else f"{number} "
    for unit in "KMGT":
        number = ((number + 500) % U64) // 1000
        if number <= 9999 or unit == "T":
            return f"{number:4d}{unit} " if table else f"{number}{unit} "
    raise AssertionError("unreachable")


def _address(addr: int, mask: int, numeric: bool) -> str:
    if mask == 0 and not numeric:
        return "anywhere"
    return format_ipv4(addr) + list_mask(mask)


def _iface(name: str, invert: bool, numeric: bool) -> str:
    return ("!" if invert else "") + (name or ("*" if numeric else "any"))


def chain_header(chain: Chain, references: int, *, verbose: bool, exact: bool) -> str:
    if not chain.builtin:
        return f"Chain {chain.name} ({references} references)"
    if not verbose:
        return f"Chain {chain.name} (policy {chain.policy})"
    packets = format_number(chain.counters.packets, exact=exact, table=False)
    nbytes = format_number(chain.counters.bytes, exact=exact, table=False)
    return f"Chain {chain.name} (policy {chain.policy} {packets}packets, {nbytes}bytes)"


def column_header(*, verbose: bool, exact: bool, line_numbers: bool) -> str:
    out = "num  " if line_numbers else ""
    if verbose:
        out += f"{'pkts':>8} {'bytes':>10} " if exact else f"{'pkts':>5} {'bytes':>5} "
    out += f"{'target':<9}  prot opt"
    if verbose:
        out += f" {'in':<6} {'out':<6} "
    out += f" {'source':<19}  {'destination':<19} "
    return out


def rule_line(rule: Rule, number: int, *, numeric: bool, verbose: bool, exact: bool,
              line_numbers: bool) -> str:
    out = f"{number:<4d} " if line_numbers else ""
    if verbose:
        out += format_number(rule.counters.packets, exact=exact)
        out += format_number(rule.counters.bytes, exact=exact)
    target = rule.target
    out += f"{target.label if target is not None else '':<9} "
    out += "!" if rule.proto_inv else " "
    out += f"{str(rule.proto) if numeric else protocol_name(rule.proto):<5}"
    out += "-- "
    if verbose:
        out += f" {_iface(rule.in_iface, rule.in_inv, numeric):<6} "
        out += f"{_iface(rule.out_iface, rule.out_inv, numeric):<6} "
    out += ("!" if rule.src_inv else " ") + f"{_address(rule.src, rule.src_mask, numeric):<19} "
    out += ("!" if rule.dst_inv else " ") + f"{_address(rule.dst, rule.dst_mask, numeric):<19} "
    if target is not None and getattr(target, "goto", False):
        out += "[goto] "
    for match in rule.matches:
        out += match.describe(numeric)
    if target is not None:
        out += target.describe(numeric)
    return out


def list_chain(table: Table, chain: Chain, *, numeric: bool = True, verbose: bool = False,
               exact: bool = False, line_numbers: bool = False, references: int | None = None) -> str:
    if references is None:
        references = table.references(chain.name)
    lines = [chain_header(chain, references, verbose=verbose, exact=exact),
             column_header(verbose=verbose, exact=exact, line_numbers=line_numbers)]
    lines += [rule_line(rule, i, numeric=numeric, verbose=verbose, exact=exact, line_numbers=line_numbers)
              for i, rule in enumerate(chain.rules, 1)]
    return "\n".join(lines) + "\n"


def list_table(table: Table, **options: bool) -> str:
    """`iptables -t T -L`: every chain, separated by an empty line."""
    references = Counter(rule.jump_chain for chain in table.chains.values() for rule in chain.rules)
    return "\n".join(list_chain(table, chain, references=references[chain.name], **options)
                     for chain in table.ordered_chains())
