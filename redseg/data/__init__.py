"""Data: photographs and lesion masks on disk, from an official archive to a prepared set.

Readers of the public layouts (IDRiD), the synthetic fundus generator, the prepared-set format that
the Caffe data layer reads (docs/data_format.md), and the field of view. May import redseg.config
and redseg.fileio only: no Caffe here, so data can be prepared on a machine without it.
"""
