"""Default verification prompts: MaxText's gpt-oss prompts plus a long passage.

The passage runs to several hundred tokens with the real tokenizer (and more with a tiny one),
so it crosses the 128-token sliding window and exercises RoPE far from position 0.
"""

DEFAULT_PROMPTS = ("I love to", "Today is a", "What is the")

LONG_PASSAGE = (
    "The river rose slowly through the night, and by morning the lower streets of the old town were "
    "under a hand's depth of brown water. People came out onto their steps with brooms and buckets, "
    "not because the brooms could do anything against a river but because standing still felt worse. "
    "The baker opened anyway. He had done it in the flood of his childhood, when his father carried "
    "loaves across the square on a plank balanced over two barrels, and he meant to do it now. By eight "
    "o'clock there was a line of boots at his door and a smell of bread over the smell of mud. "
    "Across the water, the schoolteacher counted the children who had come, which was most of them, and "
    "decided that a lesson about rivers was the only lesson anyone would listen to. She drew the valley "
    "on the board: the hills to the north where the rain had fallen for three days, the narrow gorge "
    "where the water gathered speed, the wide flat bend where the town had been built because the land "
    "was good and the crossing was easy. Every good place to live, she told them, is a good place for "
    "something else as well. The children wrote that down, and then asked whether school would close. "
    "In the afternoon the water began to fall. It left a line on every wall, a neat brown line at the "
    "same height on the church, the bakery, the school and the houses, as if someone had gone around "
    "the town with a ruler. Years later, when the children were grown, some of them could still point "
    "to where the line had been, long after the walls were painted. They remembered the bread, the "
    "lesson about the valley, and the strange quiet of a town listening to water. What they did not "
    "remember, because nobody had told them, was how close the river had come to the top of the old "
    "stone bridge, and how the engineer from the next valley had stood on it all night with a lantern, "
    "watching the water, ready to ring the bell."
)
