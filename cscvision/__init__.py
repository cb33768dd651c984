"""cscvision: map stemness-rich and immunosuppressive regions in whole-slide images.

Research use only; not for diagnosis.
"""

__version__ = "0.1.0"
