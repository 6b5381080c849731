"""The modules' logic is imported by its collection path (ansible_collections.dsmesh.cluster...), the
path Ansible itself loads it by: `make setup` links this checkout into the venv's ansible_collections.
Helpers shared by the tests are in ds_testlib.py."""

# ansible-core swaps sys.intern for a patch object when it is imported, and torch._dynamo, imported
# after it in the same process, then refuses to register its polyfill for sys.intern. The unit tests
# of both kinds share one pytest process: torch first.
import torch._dynamo  # noqa: E402,F401
