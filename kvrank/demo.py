"""The embedded demo: a corpus the project writes itself from small hand-written fact tables, a dozen queries
with known relevant passages, and `run_demo`, which indexes it, searches, and prints ranked results with
timings.

No download and no data folder: everything below is plain Python. Doc ids read `<topic>-<slug>-<n>`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kvrank.types import Dataset, Passage, Qrel, Query

if TYPE_CHECKING:
    from rich.console import Console

    from kvrank.eval.runner import EvalReport
    from kvrank.pipeline import SearchPipeline

# (country, capital, continent, official language(s), currency, a notable fact)
COUNTRIES = [
    ("France", "Paris", "Europe", "French", "euro",
     "The Eiffel Tower in Paris was completed in 1889 for the World's Fair."),
    ("Germany", "Berlin", "Europe", "German", "euro",
     "The Berlin Wall divided the city of Berlin from 1961 until it fell in 1989."),
    ("Italy", "Rome", "Europe", "Italian", "euro",
     "The Colosseum in Rome is an ancient amphitheatre completed in 80 AD."),
    ("Spain", "Madrid", "Europe", "Spanish", "euro",
     "The Sagrada Familia basilica in Barcelona was designed by the architect Antoni Gaudi."),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro",
     "The Portuguese navigator Vasco da Gama reached India by sea in 1498."),
    ("United Kingdom", "London", "Europe", "English", "pound sterling",
     "The Houses of Parliament and the Elizabeth Tower, home of the bell Big Ben, stand beside the Thames."),
    ("Ireland", "Dublin", "Europe", "Irish and English", "euro",
     "Ireland is called the Emerald Isle because of its green countryside."),
    ("Netherlands", "Amsterdam", "Europe", "Dutch", "euro",
     "Much of the Netherlands lies below sea level, protected by dikes, dunes and pumping stations."),
    ("Belgium", "Brussels", "Europe", "Dutch, French and German", "euro",
     "Brussels hosts the headquarters of the European Commission."),
    ("Switzerland", "Bern", "Europe", "German, French, Italian and Romansh", "Swiss franc",
     "Switzerland has a long tradition of neutrality and is famous for the Alps."),
    ("Austria", "Vienna", "Europe", "German", "euro",
     "Vienna was home to the composers Mozart, Beethoven and Schubert."),
    ("Greece", "Athens", "Europe", "Greek", "euro",
     "The Parthenon on the Acropolis of Athens was built in the fifth century BC."),
    ("Sweden", "Stockholm", "Europe", "Swedish", "Swedish krona",
     "The Nobel Prizes, except the Peace Prize, are presented in Stockholm every December."),
    ("Norway", "Oslo", "Europe", "Norwegian", "Norwegian krone",
     "The coastline of Norway is cut by deep fjords carved by glaciers."),
    ("Finland", "Helsinki", "Europe", "Finnish and Swedish", "euro",
     "Finland is known as the land of a thousand lakes and has around 188,000 of them."),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty",
     "The astronomer Nicolaus Copernicus was born in the Polish city of Torun."),
    ("Russia", "Moscow", "Europe and Asia", "Russian", "ruble",
     "Russia is the largest country in the world by area and spans eleven time zones."),
    ("Turkey", "Ankara", "Europe and Asia", "Turkish", "Turkish lira",
     "The city of Istanbul straddles the Bosphorus strait between Europe and Asia."),
    ("Egypt", "Cairo", "Africa", "Arabic", "Egyptian pound",
     "The Great Pyramid of Giza was built as a tomb for the pharaoh Khufu."),
    ("Nigeria", "Abuja", "Africa", "English", "naira",
     "Nigeria is the most populous country in Africa."),
    ("Kenya", "Nairobi", "Africa", "Swahili and English", "Kenyan shilling",
     "The Maasai Mara reserve in Kenya is known for the yearly migration of wildebeest."),
    ("South Africa", "Pretoria", "Africa", "Zulu, Xhosa, Afrikaans and English, among others", "rand",
     "South Africa has three capital cities: Pretoria, Cape Town and Bloemfontein."),
    ("Morocco", "Rabat", "Africa", "Arabic and Berber", "Moroccan dirham",
     "The old walled medina of Marrakesh in Morocco is a UNESCO World Heritage Site."),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "birr",
     "Ethiopia is thought to be the birthplace of the coffee plant."),
    ("China", "Beijing", "Asia", "Mandarin Chinese", "renminbi (yuan)",
     "The Great Wall of China stretches for thousands of kilometres across northern China."),
    ("Japan", "Tokyo", "Asia", "Japanese", "yen",
     "Mount Fuji is the highest mountain in Japan at 3,776 metres."),
    ("South Korea", "Seoul", "Asia", "Korean", "won",
     "South Korea is home to the electronics makers Samsung and LG."),
    ("India", "New Delhi", "Asia", "Hindi and English", "Indian rupee",
     "The Taj Mahal in Agra was built by the Mughal emperor Shah Jahan in memory of his wife."),
    ("Indonesia", "Jakarta", "Asia", "Indonesian", "rupiah",
     "Indonesia is an archipelago of more than 17,000 islands."),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht",
     "Thailand is the only country in Southeast Asia that was never colonised by a European power."),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong",
     "Ha Long Bay in Vietnam is famous for its thousands of limestone islands."),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic", "Saudi riyal",
     "Mecca, in Saudi Arabia, is the holiest city of Islam."),
    ("United States", "Washington, D.C.", "North America", "English", "US dollar",
     "The Statue of Liberty in New York Harbor was a gift from the people of France."),
    ("Canada", "Ottawa", "North America", "English and French", "Canadian dollar",
     "Canada has the longest coastline of any country in the world."),
    ("Mexico", "Mexico City", "North America", "Spanish", "Mexican peso",
     "The Maya city of Chichen Itza lies on the Yucatan Peninsula of Mexico."),
    ("Brazil", "Brasilia", "South America", "Portuguese", "Brazilian real",
     "The Amazon rainforest covers much of northern Brazil."),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "Argentine peso",
     "Aconcagua, in the Argentine Andes, is the highest mountain in the Americas."),
    ("Peru", "Lima", "South America", "Spanish and Quechua", "sol",
     "Machu Picchu is a fifteenth-century Inca citadel high in the Andes of Peru."),
    ("Chile", "Santiago", "South America", "Spanish", "Chilean peso",
     "The Atacama Desert in northern Chile is one of the driest places on Earth."),
    ("Colombia", "Bogota", "South America", "Spanish", "Colombian peso",
     "Colombia is one of the world's largest producers of coffee."),
    ("Australia", "Canberra", "Oceania", "English", "Australian dollar",
     "The Great Barrier Reef off Queensland is the largest coral reef system in the world."),
    ("New Zealand", "Wellington", "Oceania", "English and Maori", "New Zealand dollar",
     "In 1893 New Zealand became the first self-governing country to give women the right to vote."),
]

# (element, symbol, atomic number, category, a notable fact)
ELEMENTS = [
    ("Hydrogen", "H", 1, "nonmetal",
     "Hydrogen is the lightest element and the most abundant in the universe."),
    ("Helium", "He", 2, "noble gas",
     "Helium is lighter than air and is used to fill party balloons and airships."),
    ("Lithium", "Li", 3, "alkali metal",
     "Lithium is the key ingredient of rechargeable lithium-ion batteries."),
    ("Carbon", "C", 6, "nonmetal",
     "Carbon forms both diamond and graphite and is the basis of organic chemistry."),
    ("Nitrogen", "N", 7, "nonmetal", "Nitrogen makes up about 78 percent of the air in Earth's atmosphere."),
    ("Oxygen", "O", 8, "nonmetal",
     "Oxygen makes up about 21 percent of the air and is needed by most living things to breathe."),
    ("Fluorine", "F", 9, "halogen", "Fluoride compounds are added to toothpaste to prevent tooth decay."),
    ("Neon", "Ne", 10, "noble gas",
     "Neon glows a bright red-orange in the tubes of electric advertising signs."),
    ("Sodium", "Na", 11, "alkali metal",
     "Sodium combines with chlorine to form table salt, sodium chloride."),
    ("Magnesium", "Mg", 12, "alkaline earth metal",
     "Magnesium burns with a brilliant white flame and is used in fireworks and flares."),
    ("Aluminium", "Al", 13, "post-transition metal",
     "Aluminium is light and resists corrosion, so it is used for drink cans and aircraft."),
    ("Silicon", "Si", 14, "metalloid",
     "Silicon is the semiconductor from which most computer chips are made."),
    ("Phosphorus", "P", 15, "nonmetal",
     "Phosphorus is part of DNA and of ATP, the molecule that carries energy in cells."),
    ("Sulfur", "S", 16, "nonmetal",
     "Sulfur is a yellow solid; its compound hydrogen sulfide smells of rotten eggs."),
    ("Chlorine", "Cl", 17, "halogen", "Chlorine is used to disinfect drinking water and swimming pools."),
    ("Argon", "Ar", 18, "noble gas", "Argon is the third most abundant gas in Earth's atmosphere."),
    ("Potassium", "K", 19, "alkali metal", "Bananas are a well-known dietary source of potassium."),
    ("Calcium", "Ca", 20, "alkaline earth metal",
     "Calcium is the mineral that builds strong bones and teeth."),
    ("Titanium", "Ti", 22, "transition metal",
     "Titanium is strong and light and is used in aircraft and in medical implants."),
    ("Iron", "Fe", 26, "transition metal", "Iron is the main component of steel and of Earth's core."),
    ("Copper", "Cu", 29, "transition metal",
     "Copper conducts electricity well and is used for electrical wiring."),
    ("Zinc", "Zn", 30, "transition metal",
     "Zinc coats steel to protect it from rust in a process called galvanising."),
    ("Silver", "Ag", 47, "transition metal",
     "Silver has the highest electrical conductivity of any element."),
    ("Tin", "Sn", 50, "post-transition metal", "Tin is alloyed with copper to make bronze."),
    ("Iodine", "I", 53, "halogen", "Iodine is needed by the thyroid gland, so it is added to table salt."),
    ("Platinum", "Pt", 78, "transition metal",
     "Platinum is used in the catalytic converters that clean car exhaust."),
    ("Gold", "Au", 79, "transition metal",
     "Gold does not tarnish and has been used for coins and jewellery for thousands of years."),
    ("Mercury", "Hg", 80, "transition metal",
     "Mercury is the only metal that is liquid at room temperature."),
    ("Lead", "Pb", 82, "post-transition metal",
     "Lead was once added to paint and petrol until its toxicity was recognised."),
    ("Uranium", "U", 92, "actinide", "Uranium-235 is the fuel of most nuclear power reactors."),
]

# (animal, class, habitat, diet, a notable fact)
ANIMALS = [
    ("African elephant", "mammal", "the savannas and forests of Africa", "grasses, leaves, bark and fruit",
     "The African elephant is the largest living land animal."),
    ("giant panda", "mammal", "the mountain forests of central China", "bamboo shoots and leaves",
     "Giant pandas spend about half of every day eating bamboo."),
    ("cheetah", "mammal", "the grasslands of Africa", "gazelles, impalas and hares",
     "The cheetah is the fastest land animal, reaching about 100 kilometres per hour in short sprints."),
    ("lion", "mammal", "the African savanna", "zebras, wildebeest and buffalo",
     "Lions are the only cats that live in social groups, called prides."),
    ("tiger", "mammal", "the forests of Asia", "deer and wild boar",
     "The tiger is the largest living species of cat."),
    ("gray wolf", "mammal", "the forests and tundra of North America, Europe and Asia",
     "deer, elk and moose hunted in packs", "Wolves communicate over long distances by howling."),
    ("polar bear", "mammal", "the sea ice of the Arctic", "seals",
     "Polar bears have black skin under their thick, translucent fur."),
    ("red kangaroo", "marsupial mammal", "the grasslands and deserts of Australia", "grasses and shrubs",
     "Female kangaroos carry their young, called joeys, in a pouch."),
    ("koala", "marsupial mammal", "the eucalyptus forests of eastern Australia", "eucalyptus leaves",
     "Koalas sleep for up to twenty hours a day."),
    ("blue whale", "mammal", "oceans around the world", "tiny crustaceans called krill",
     "The blue whale is the largest animal known to have ever lived."),
    ("bottlenose dolphin", "mammal", "warm and temperate seas", "fish and squid",
     "Dolphins use echolocation, bouncing clicks off objects, to find their prey."),
    ("fruit bat", "mammal", "tropical forests of Africa, Asia and Australia", "fruit and nectar",
     "Bats are the only mammals capable of sustained flight."),
    ("giraffe", "mammal", "the African savanna", "leaves of acacia trees",
     "The giraffe is the tallest living animal, growing up to about 5.5 metres."),
    ("hippopotamus", "mammal", "the rivers and lakes of Africa", "grass grazed at night",
     "Hippos spend the day in water to keep their sensitive skin cool."),
    ("chimpanzee", "mammal", "the forests of central and West Africa", "fruit, leaves and insects",
     "Chimpanzees use sticks as tools to fish termites out of their mounds."),
    ("bald eagle", "bird", "North America near lakes and rivers", "fish",
     "The bald eagle is the national bird of the United States."),
    ("emperor penguin", "bird", "the sea ice of Antarctica", "fish, krill and squid",
     "Male emperor penguins keep the egg warm on their feet through the Antarctic winter."),
    ("ostrich", "bird", "the savannas of Africa", "plants, seeds and insects",
     "The ostrich is the largest living bird; it cannot fly but runs at about 70 kilometres per hour."),
    ("peregrine falcon", "bird", "cliffs and tall buildings on every continent except Antarctica",
     "other birds caught in flight",
     "The peregrine falcon is the fastest animal of all, diving at more than 300 kilometres per hour."),
    ("hummingbird", "bird", "the Americas", "flower nectar and small insects",
     "Hummingbirds can hover in place and even fly backwards."),
    ("barn owl", "bird", "farmland and grassland around the world", "mice, voles and other small rodents",
     "Barn owls can catch prey in complete darkness by hearing alone."),
    ("green sea turtle", "reptile", "tropical and subtropical oceans", "seagrass and algae",
     "Sea turtles return to the beach where they hatched to lay their own eggs."),
    ("Komodo dragon", "reptile", "a few islands of Indonesia", "deer, pigs and carrion",
     "The Komodo dragon is the largest living lizard."),
    ("Nile crocodile", "reptile", "the rivers and marshes of Africa",
     "fish, zebras and other animals that come to drink",
     "The Nile crocodile is the largest crocodilian in Africa."),
    ("king cobra", "reptile", "the forests of South and Southeast Asia", "other snakes",
     "The king cobra is the longest venomous snake in the world."),
    ("poison dart frog", "amphibian", "the rainforests of Central and South America",
     "ants and small insects",
     "The bright colours of poison dart frogs warn predators that their skin is toxic."),
    ("axolotl", "amphibian", "the lakes near Mexico City", "worms, insects and small fish",
     "The axolotl can regrow lost limbs, and even parts of its heart."),
    ("great white shark", "fish", "coastal oceans around the world", "seals, fish and sea lions",
     "Great white sharks sense the tiny electric fields given off by their prey."),
    ("Atlantic salmon", "fish", "the North Atlantic and the rivers that flow into it",
     "insects and small fish",
     "Salmon swim upstream to the river where they hatched in order to spawn."),
    ("common octopus", "mollusc", "rocky sea floors", "crabs and shellfish",
     "An octopus has three hearts and blue blood."),
    ("honey bee", "insect", "hives in gardens, meadows and forests", "flower nectar and pollen",
     "Honey bees tell their hive mates where flowers are with a waggle dance."),
    ("monarch butterfly", "insect", "North America", "milkweed as caterpillars and nectar as adults",
     "Monarch butterflies migrate thousands of kilometres to Mexico for the winter."),
]

# (planet, position from the Sun, kind, fact, fact)
PLANETS = [
    ("Mercury", "first", "small rocky planet",
     "Mercury is the smallest planet, and a year there lasts only 88 Earth days.",
     "Mercury has almost no atmosphere, so its temperature swings from about 430 to minus 180 degrees "
     "Celsius."),
    ("Venus", "second", "rocky planet",
     "Venus is the hottest planet because its thick carbon dioxide atmosphere traps heat.",
     "Venus spins backwards compared with most planets, so the Sun rises in the west there."),
    ("Earth", "third", "rocky planet",
     "Earth is the only planet known to support life.",
     "About 71 percent of Earth's surface is covered by oceans."),
    ("Mars", "fourth", "rocky planet",
     "Mars is called the Red Planet because iron oxide dust colours its surface.",
     "Olympus Mons on Mars is the tallest volcano in the solar system."),
    ("Jupiter", "fifth", "gas giant",
     "Jupiter is the largest planet in the solar system, more massive than all the others combined.",
     "The Great Red Spot on Jupiter is a giant storm wider than Earth."),
    ("Saturn", "sixth", "gas giant",
     "Saturn is famous for its bright rings made of ice and rock.",
     "Titan, the largest moon of Saturn, has a thick atmosphere and lakes of liquid methane."),
    ("Uranus", "seventh", "ice giant",
     "Uranus rotates on its side, with its axis tilted by about 98 degrees.",
     "Uranus was discovered by William Herschel in 1781, the first planet found with a telescope."),
    ("Neptune", "eighth", "ice giant",
     "Neptune has the strongest winds in the solar system.",
     "Neptune was discovered in 1846 after mathematicians predicted its position."),
]

# (language, year, creator, a notable fact)
LANGUAGES = [
    ("Python", 1991, "Guido van Rossum",
     "Python emphasises readable code with significant indentation and is widely used for data science and "
     "machine learning."),
    ("C", 1972, "Dennis Ritchie at Bell Labs", "C was used to rewrite the Unix operating system."),
    ("C++", 1985, "Bjarne Stroustrup", "C++ adds classes, templates and object-oriented programming to C."),
    ("Java", 1995, "James Gosling at Sun Microsystems",
     "Java programs compile to bytecode that runs on the Java Virtual Machine: write once, run anywhere."),
    ("JavaScript", 1995, "Brendan Eich at Netscape",
     "JavaScript runs in every web browser and makes web pages interactive."),
    ("Rust", 2015, "Graydon Hoare and Mozilla",
     "Rust guarantees memory safety without a garbage collector through ownership and borrowing rules."),
    ("Go", 2009, "Robert Griesemer, Rob Pike and Ken Thompson at Google",
     "Go has goroutines and channels for concurrent programming and compiles quickly."),
    ("Haskell", 1990, "a committee of researchers",
     "Haskell is a purely functional language with lazy evaluation and a strong static type system."),
    ("Lisp", 1958, "John McCarthy",
     "Lisp pioneered garbage collection and represents programs as lists, so code can be treated as data."),
    ("Fortran", 1957, "John Backus at IBM",
     "Fortran was the first widely used high-level language and is still used for scientific computing."),
    ("COBOL", 1959, "a committee influenced by Grace Hopper",
     "COBOL still runs many banking and government systems."),
    ("Ruby", 1995, "Yukihiro Matsumoto",
     "Ruby became popular through the Ruby on Rails framework for web applications."),
    ("PHP", 1995, "Rasmus Lerdorf", "PHP is a server-side scripting language that powers WordPress."),
    ("Swift", 2014, "Apple", "Swift is used to build apps for the iPhone, iPad and Mac."),
    ("Kotlin", 2011, "JetBrains", "Kotlin is an officially supported language for Android app development."),
    ("SQL", 1974, "Donald Chamberlin and Raymond Boyce at IBM",
     "SQL is a declarative language for querying and updating relational databases."),
    ("Prolog", 1972, "Alain Colmerauer",
     "Prolog is a logic programming language: programs are facts and rules, and answers are found by "
     "search."),
    ("R", 1993, "Ross Ihaka and Robert Gentleman", "R is a language for statistical computing and graphics."),
    ("Julia", 2012, "Jeff Bezanson, Stefan Karpinski, Viral Shah and Alan Edelman",
     "Julia uses just-in-time compilation to make numerical computing fast."),
    ("Pascal", 1970, "Niklaus Wirth", "Pascal was designed to teach structured programming."),
]

# (sport, who plays it, how it is played, a notable fact)
SPORTS = [
    ("Association football", "two teams of eleven players",
     "by kicking a ball into the opposing goal on a grass pitch",
     "The FIFA World Cup, the biggest football tournament, is held every four years."),
    ("Basketball", "two teams of five players", "by shooting a ball through a raised hoop",
     "Basketball was invented by James Naismith in 1891 in Springfield, Massachusetts."),
    ("Baseball", "two teams of nine players", "with a bat and ball on a diamond with four bases",
     "A standard baseball game lasts nine innings."),
    ("Cricket", "two teams of eleven players", "with a bat, a ball and two wickets",
     "A Test match of cricket can last up to five days."),
    ("Rugby union", "two teams of fifteen players", "by carrying, passing and kicking an oval ball",
     "A try, grounding the ball over the opponents' line, scores five points in rugby union."),
    ("Ice hockey", "two teams of six players including a goaltender", "by shooting a puck on ice with sticks",
     "Ice hockey players can be substituted on the fly while play continues."),
    ("Volleyball", "two teams of six players", "by hitting a ball over a high net",
     "A volleyball team may touch the ball at most three times before sending it back over the net."),
    ("Tennis", "one or two players per side", "by hitting a ball over a net with rackets",
     "The four Grand Slam tennis tournaments are the Australian Open, the French Open, Wimbledon and the "
     "US Open."),
    ("Golf", "individual players", "by hitting a ball into a series of holes with clubs",
     "Golfers try to finish each hole in as few strokes as possible; a standard course has 18 holes."),
    ("Table tennis", "one or two players per side", "by hitting a light ball across a table with paddles",
     "A game of table tennis is played to 11 points."),
    ("Swimming", "individual swimmers and relay teams", "by racing through water in a pool",
     "The four competitive swimming strokes are freestyle, backstroke, breaststroke and butterfly."),
    ("Marathon running", "individual runners", "by racing on roads over a long distance",
     "The marathon distance is 42.195 kilometres."),
    ("Road cycling", "individual riders in teams", "by racing bicycles on roads",
     "The Tour de France is a three-week cycling stage race held every July."),
    ("Badminton", "one or two players per side", "by hitting a shuttlecock over a net with rackets",
     "Badminton is the fastest racket sport: smashes have exceeded 400 kilometres per hour."),
    ("Handball", "two teams of seven players including a goalkeeper",
     "by throwing a ball into the opposing goal",
     "Handball is usually played indoors and was first played in northern Europe."),
]

# (invention, inventor, when, a notable fact)
INVENTIONS = [
    ("telephone", "Alexander Graham Bell", "1876",
     "Bell's first words on the telephone were to his assistant: 'Mr. Watson, come here.'"),
    ("practical incandescent light bulb", "Thomas Edison", "1879",
     "Edison's carbon filament lamp could burn for many hours, making electric lighting practical."),
    ("printing press with movable type", "Johannes Gutenberg", "around 1440",
     "The Gutenberg Bible was one of the first major books printed with movable metal type."),
    ("improved steam engine", "James Watt", "1769",
     "Watt's separate condenser made steam engines far more efficient and powered the Industrial "
     "Revolution."),
    ("powered airplane", "the Wright brothers", "1903",
     "The first powered flight, at Kitty Hawk in North Carolina, lasted 12 seconds."),
    ("radio telegraph", "Guglielmo Marconi", "1895",
     "Marconi sent a radio signal across the Atlantic Ocean in 1901."),
    ("penicillin", "Alexander Fleming", "1928",
     "Fleming noticed that a mould killed bacteria in a petri dish, which led to the first antibiotic."),
    ("World Wide Web", "Tim Berners-Lee", "1989",
     "Berners-Lee proposed the Web at CERN, together with HTML, URLs and HTTP."),
    ("telescope", "Hans Lippershey", "1608",
     "Galileo improved the telescope and discovered four moons of Jupiter in 1610."),
    ("smallpox vaccine", "Edward Jenner", "1796",
     "Jenner used material from cowpox sores to protect people against smallpox."),
    ("dynamite", "Alfred Nobel", "1867", "The fortune Nobel made from dynamite funds the Nobel Prizes."),
    ("phonograph", "Thomas Edison", "1877",
     "The phonograph recorded and played back sound on a cylinder wrapped in tin foil."),
    ("television", "John Logie Baird", "1926",
     "Baird gave the first public demonstration of television images in London."),
    ("transistor", "John Bardeen, Walter Brattain and William Shockley at Bell Labs", "1947",
     "Transistors replaced vacuum tubes and made modern computers possible."),
    ("automobile", "Karl Benz", "1886",
     "The Benz Patent-Motorwagen is regarded as the first practical automobile."),
    ("magnetic compass", "Chinese inventors", "the Song dynasty",
     "A compass needle is magnetised, so it points north and helps sailors navigate."),
    ("paper", "Cai Lun", "around 105 AD",
     "Cai Lun, an official of the Han dynasty, improved papermaking using bark, hemp and rags."),
    ("electric battery", "Alessandro Volta", "1800",
     "Volta's pile of zinc and copper discs was the first battery; the volt is named after him."),
    ("sewing machine", "Elias Howe", "1846",
     "Howe's lockstitch sewing machine used a needle with the eye near its point."),
    ("TCP/IP internet protocols", "Vint Cerf and Bob Kahn", "1974",
     "TCP/IP lets separate computer networks exchange data and became the basis of the Internet."),
]

# (query id, text, {doc id: relevance}); 2 = answers it, 1 = on topic.
DEMO_QUERIES = [
    ("q01", "What is the capital of Japan?", {"country-japan-1": 2}),
    ("q02", "Which chemical element has the symbol Fe?", {"element-iron-1": 2, "element-iron-2": 1}),
    ("q03", "Who created the Python programming language?", {"language-python-1": 2, "language-python-2": 1}),
    ("q04", "largest planet in the solar system", {"planet-jupiter-1": 2, "planet-jupiter-2": 1}),
    ("q05", "fastest land animal", {"animal-cheetah-2": 2, "animal-cheetah-1": 1}),
    ("q06", "who invented the telephone", {"invention-telephone-1": 2, "invention-telephone-2": 1}),
    ("q07", "what do giant pandas eat", {"animal-giant-panda-1": 2, "animal-giant-panda-2": 2}),
    ("q08", "which currency is used in Brazil", {"country-brazil-2": 2}),
    ("q09", "gas used to fill balloons", {"element-helium-2": 2, "element-helium-1": 1}),
    ("q10", "memory safety without a garbage collector", {"language-rust-2": 2, "language-rust-1": 1}),
    ("q11", "tallest volcano in the solar system", {"planet-mars-2": 2}),
    ("q12", "how many players are on a basketball team", {"sport-basketball-1": 2, "sport-basketball-2": 1}),
]


def demo_passages() -> list[Passage]:
    """The demo corpus (a few hundred passages), generated from the tables above."""
    out: list[Passage] = []

    def add(topic: str, name: str, texts: list[str]) -> None:
        for n, text in enumerate(texts, start=1):
            out.append(Passage(f"{topic}-{_slug(name)}-{n}", name, text))

    for country, capital, continent, languages, currency, fact in COUNTRIES:
        plural = " and " in languages or "," in languages
        add("country", country, [
            f"{country} is a country in {continent}. Its capital city is {capital}.",
            f"The currency of {country} is the {currency}, and its official "
            f"{'languages are' if plural else 'language is'} {languages}.",
            fact,
        ])
    for element, symbol, number, category, fact in ELEMENTS:
        add("element", element, [
            f"{element} is the chemical element with symbol {symbol} and atomic number {number}. "
            f"It is classed as {_article(category)} {category}.",
            fact,
        ])
    for animal, cls, habitat, diet, fact in ANIMALS:
        add("animal", animal, [
            f"The {animal} is {_article(cls)} {cls} that lives in {habitat}. It eats {diet}.",
            fact,
        ])
    for planet, position, kind, fact1, fact2 in PLANETS:
        intro = f"{planet} is the {position} planet from the Sun, {_article(kind)} {kind}."
        add("planet", planet, [f"{intro} {fact1}", fact2])
    for language, year, creator, fact in LANGUAGES:
        intro = f"{language} is a programming language created by {creator} in {year}."
        add("language", language, [intro, fact])
    for sport, players, how, fact in SPORTS:
        add("sport", sport, [f"{sport} is played by {players}, {how}.", fact])
    for invention, inventor, when, fact in INVENTIONS:
        add("invention", invention, [f"The {invention} was invented by {inventor} in {when}.", fact])
    return out


def demo_dataset() -> Dataset:
    """The demo corpus, queries and graded qrels as a Dataset, the type every test collection loads into."""
    corpus = {p.doc_id: p for p in demo_passages()}
    queries = {qid: Query(qid, text) for qid, text, _ in DEMO_QUERIES}
    qrels = [Qrel(qid, doc_id, rel) for qid, _, judged in DEMO_QUERIES for doc_id, rel in judged.items()]
    return Dataset(name="kvrank-demo", corpus=corpus, queries=queries, qrels=qrels, source="kvrank.demo")


def run_demo(console: Console, pipeline: SearchPipeline, dataset: Dataset | None = None, *,
             k: int = 5) -> EvalReport:
    """Search every demo query with `pipeline`, print the top `k` per query with scores and marks for the known
    relevant passages, then metrics and per-stage latency. With a reranker, every query then runs a second time
    to show passage KV reuse."""
    from rich.markup import escape
    from rich.table import Table

    from kvrank.eval.report import report_tables
    from kvrank.eval.runner import run_eval

    dataset = dataset or demo_dataset()
    n_docs, n_queries = len(dataset.corpus), len(dataset.queries)
    reranking = pipeline.reranker is not None
    console.print(f"[bold]kvrank demo[/bold]: {n_docs} passages, {n_queries} queries, "
                  f"{escape(pipeline.first_stage.name)} retrieval"
                  + (f", reranking the top {pipeline.config.rerank_depth} ({pipeline.mode})" if reranking else ""))
    report = run_eval(dataset, pipeline, settings={"demo": True, "rerank_mode": pipeline.mode})
    relevant = dataset.grades()
    for query in dataset.sorted_queries():
        table = Table(title=f"{query.query_id}: {escape(query.text)}", title_justify="left", show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("doc")
        table.add_column("passage", overflow="fold")
        for rank, doc in enumerate(report.run[query.query_id][:k], start=1):
            rel = relevant.get(query.query_id, {}).get(doc.doc_id, 0)
            mark = "[green]*[/green] " if rel >= 2 else ("[yellow]+[/yellow] " if rel == 1 else "")
            table.add_row(str(rank), f"{doc.score:.4f}", mark + escape(doc.doc_id),
                          escape(_shorten(dataset.corpus[doc.doc_id].text, 80)))
        console.print(table)
    console.print("[green]*[/green] answers the query, [yellow]+[/yellow] on topic")
    for renderable in report_tables(report):
        console.print(renderable)
    if reranking:
        _show_kv_reuse(console, dataset, pipeline, report)
    return report


def _show_kv_reuse(console: Console, dataset: Dataset, pipeline: SearchPipeline, first: EvalReport) -> None:
    """Run every query again: each passage's KV is now in the store, so no prefill happens at all."""
    from rich.table import Table

    from kvrank.eval.runner import run_eval

    before = pipeline.describe()
    again = run_eval(dataset, pipeline, warmup=0)
    table = Table(title="KV reuse: the same queries again, passage KV read from the store", title_justify="left")
    table.add_column("stage")
    table.add_column("first pass p50 ms", justify="right")
    table.add_column("second pass p50 ms", justify="right")
    for stage in ("kv_lookup", "prefill", "scoring", "rerank"):
        ms_first, ms_again = first.latency_ms.get(stage, {}), again.latency_ms.get(stage, {})
        table.add_row(stage, f"{ms_first.get('p50', 0.0):.1f}", f"{ms_again.get('p50', 0.0):.1f}")
    console.print(table)
    same = all([d.doc_id for d in first.run[q]] == [d.doc_id for d in again.run[q]] for q in first.run)
    after = pipeline.describe()
    console.print(f"passages prefilled: {before['prefills']} in the first pass, "
                  f"{after['prefills'] - before['prefills']} in the second; KV store "
                  f"{after['kv_cache']['entries']} entries, {after['kv_cache']['bytes'] / 2**20:.1f} MiB, "
                  f"hit rate {after['kv_cache']['hit_rate']:.0%}")
    console.print(f"rankings of the second pass are {'identical' if same else 'DIFFERENT'} to the first")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("+", "p")).strip("-")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "..."


__all__ = ["DEMO_QUERIES", "demo_dataset", "demo_passages", "run_demo"]
