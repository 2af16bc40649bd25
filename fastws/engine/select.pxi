# Upstream groups: nginx's peer selection.
