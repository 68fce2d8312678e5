"""What one rank builds and keeps: layers on its device, tie links, checkpoint files, seeds.

Unlike :mod:`pipemodule._layout`, the code here talks to other ranks or touches a device; it
acts on a layout and never changes it.
"""
