"""`meshfed up`: a whole federation on one machine (docs/up.md)."""
