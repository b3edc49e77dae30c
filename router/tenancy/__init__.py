"""Tenancy: API keys, tenants, quotas, their database tables and admin API.

`service.Tenancy` is the one object the router's app wires in; everything
tenant-specific stays behind it.
"""
