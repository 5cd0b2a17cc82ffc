"""The billing console: server-rendered pages under /console on the control plane."""
