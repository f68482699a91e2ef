"""The benchmark image datasets in their native layouts (VOC2007, MS-COCO 2014, NUS-WIDE), their class splits,
partial labels and held-out validation images. Readers return :class:`dbtr.data.images.ImageRecords`."""
