"""Compiled descriptor sets of protos/*.proto (`python -m gateway.protogen`). Do not edit."""
