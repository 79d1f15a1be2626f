"""Default limits that the CLI shows in its options; a module without NumPy, so that ``deepspot --help`` stays fast."""

#: Largest bag (sub-spots or neighbours per item) accepted by default: real data has 6-9 (Visium) or 44-45
#: (Xenium), and a bag of 200,000 neighbours for 17 items took 7 GB. ``--max-bag`` raises it.
MAX_BAG = 1024
