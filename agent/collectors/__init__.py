"""Metric collectors (psutil, Telegraf-compatible names) and the set that runs them.

Build them with `agent.collectors.scheduler.build_collectors`; run them with `CollectorSet`.
"""
