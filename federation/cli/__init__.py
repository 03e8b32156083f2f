"""The meshfed command line (the application root: may import every part)."""
