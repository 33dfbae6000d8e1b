"""Outbound edge agents: the paired Desktop and the Standalone Team Gateway.

Edges dial out only; they never import `hub` internals or the database.
"""
