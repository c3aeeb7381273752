"""Imported only by multiprocessing's forkserver (`set_forkserver_preload`): it ends when its parent does."""

from markerless.pipeline.parent_death import die_with_parent

die_with_parent()
