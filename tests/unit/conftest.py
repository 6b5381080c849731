"""The modules' logic is imported by its collection path (ansible_collections.dsmesh.cluster...), the
path Ansible itself loads it by: `make setup` links this checkout into the venv's ansible_collections.
Helpers shared by the tests are in ds_testlib.py."""
