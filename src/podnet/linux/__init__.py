"""The Linux edge (root only): pod netns, TAPs, and the record of what podnet created.

Modules: names (prefixed names), netns (namespaces, running code inside one), tap (TAP devices,
vnet header, offloads), pod (CNI-style plumbing), resources (journal, release, `clean`).
"""
