"""Flower ClientApps: the fedmerge client (compressed task vectors) and a plain dense client."""
