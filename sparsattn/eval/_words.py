"""Built-in English word lists for the synthetic tasks (keys of needles, common-word extraction).

RULER draws these from the `wonderwords` package; we keep a fixed list in the source instead so
that generation is offline and identical on every machine.
"""
from __future__ import annotations

ADJECTIVES: tuple[str, ...] = tuple("""
able absent acidic active adorable agile alert ancient angry anxious arctic awkward bashful
bitter blazing bold brave breezy brief bright brisk broken bumpy busy calm careful cheerful
chilly clever cloudy clumsy coastal cold colossal cozy crimson crisp cruel curious curly damp
dark dazzling deep delicate dense dizzy dusty eager early earnest elastic elegant empty fancy
fearless fierce flat fluffy foggy fragile frantic fresh friendly frozen fuzzy gentle giant
glossy golden graceful grumpy happy hasty heavy hidden hollow honest humble icy idle jolly
joyous kind lazy little lively lonely loud lucky majestic massive mellow merry mighty misty
modest muddy narrow nervous noble noisy obedient odd orange patient plain polite proud purple
quick quiet rapid rare restless rough round rusty salty sandy scarlet secret serene shaggy
sharp shiny silent silky silver simple sleepy slim slow smooth soft solid sour sparkling
spicy steady sticky stormy strange strict sturdy subtle sudden sunny swift tall tame tender
thirsty tidy tiny tough tranquil vast velvet vivid wandering warm wary wild windy wise witty
wooden young zealous
""".split())

NOUNS: tuple[str, ...] = tuple("""
acorn actor airport album anchor apple apron arch arrow attic avenue badge bakery balloon
bamboo banana banjo barn basket beach beacon beard bell bench berry bicycle blanket blossom
boat bonnet bottle boulder bracelet branch bread bridge brook broom bucket buffalo butter
button cabin cactus camel candle canoe canyon captain carpet castle cathedral cellar chair
cherry chimney circus cliff clock cloud coconut comet compass cottage crayon creek crown
cupboard curtain daisy desert diamond dolphin donkey dragon drum eagle easel elephant engine
falcon feather fence fiddle forest fountain fox galaxy garden giraffe glacier goblet goose
guitar hammer harbor harp hedge helmet honey horizon hotel island jacket jaguar jewel kettle
kitten ladder lagoon lantern lemon library lighthouse lily lion lizard locket magnet mango
maple marble meadow melody mirror monkey mountain mushroom needle nest notebook oasis ocean
orchard otter owl paddle palace panda parrot peach pebble pencil pepper piano pillow planet
pocket pony potato pumpkin puzzle quilt rabbit radio raven ribbon river robot rocket saddle
sailor salmon satchel scarf shell shovel signal skyline sled snail spoon squirrel stable
statue storm stream sunflower swan tablet teapot telescope temple thunder tiger tortoise
tower tractor trumpet tulip tunnel turtle umbrella valley vase violin volcano wagon walnut
whale whistle willow window wizard wolf yacht zebra
""".split())

VERBS: tuple[str, ...] = tuple("""
accept adjust admire advise allow answer applaud arrange arrive bake balance bathe behave
belong bless blink boil borrow bounce breathe brush build calculate carry chase cheer chew
climb collect compare complain count crawl cross dance deliver describe dig discover divide
drift drink drop earn embrace enjoy escape examine explain explore fetch fix float fold
follow gather giggle glide grab greet guard guess hammer hang harvest hike hover hum hunt
hurry imagine improve invent invite jog juggle jump kneel knit knock laugh launch lift listen
march measure melt mend mix nod notice obey offer open pack paint paddle perform pinch plant
polish pour pray preach press print pull punch push question race rescue rinse roar rush
sail scatter scribble search shiver sketch skip slide smile sneeze sparkle spill sprint
squeeze stitch stretch stroll swim swing tackle travel tremble trust tumble unfold vanish
wander wash whisper wink wobble wonder wrap yawn yell zoom
""".split())


def _unique(words: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


#: all single words, deduplicated, in a fixed order
SINGLE_WORDS: tuple[str, ...] = _unique(ADJECTIVES + NOUNS + VERBS)
