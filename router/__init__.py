"""Routing rules and the live route table."""
