"""Views: the static cohort report (``cscvision report``) and the browser slide viewer
(``cscvision view``) over a batch's outputs. The stage just below the CLI."""
