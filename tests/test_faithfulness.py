"""What ROUGE misses: numbers and content words a summary has and its report lacks (distil/faithfulness.py),
pinned on hand-made EN/ES/FR/PT examples; and the teacher's grounding reading numbers the same way."""

import pytest

from distil.faithfulness import Share, content_words, novel_terms, number_mentions, read_number, unsupported_numbers
from teacher_serving.grounding import extract_facts, grounding_score


@pytest.mark.parametrize("token,lang,value", [
    ("1,056,000", "en", ("1056000",)),     # thousands commas
    ("1.056.000", "es", ("1056000",)),     # thousands points
    ("1.056.000", "en", ("1056000",)),     # several equal separators before 3-digit groups: thousands anywhere
    ("1 056 000", "fr", ("1056000",)),     # space
    ("1\u202f056\u202f000", "fr", ("1056000",)),  # narrow no-break space
    ("1\u00a0056", "pt", ("1056",)),       # no-break space
    ("11.7", "en", ("11.7",)),
    ("11,7", "es", ("11.7",)),             # decimal comma
    ("11,7", "en", ("11.7",)),             # not 3 digits after: a decimal mark in every language
    ("3,110", "en", ("3110",)),            # lone separator before 3 digits: by language
    ("3,125", "pt", ("3.125",)),
    ("7.418", "en", ("7.418",)),
    ("6.840", "pt", ("6840",)),
    ("1.500", "fr", ("1500",)),
    ("0,001", "en", ("0.001",)),           # 0 before: always a decimal
    ("1.056,5", "es", ("1056.5",)),        # thousands point, decimal comma
    ("1,056.500", "en", ("1056.5",)),      # thousands comma, decimal point; trailing zeros dropped
    ("2.50", "en", ("2.5",)),
    ("007", "en", ("7",)),
    ("1,2,3", "en", ("1", "2", "3")),      # no single number: its parts
])
def test_read_number(token, lang, value):
    assert read_number(token, lang) == value


def test_mentions_skip_names_and_ignore_glued_units():
    text = "5mg, pO2 80 mmHg, CD4 200/mm3, 2nd dose, 650-1,600, SpO2 91%"
    assert [m.parts for m in number_mentions(text, "en")] == [("5",), ("80",), ("200",), ("2",), ("650",),
                                                              ("1600",), ("91",)]
    # a numeric date is one number whose parts are its components
    assert [m.parts for m in number_mentions("on 12/03/2020 and 2020-03-12", "en")] == [("12", "3", "2020"),
                                                                                        ("2020", "3", "12")]


def test_unsupported_numbers_en():
    report = "A 62-year-old man; platelets 1,056,000/mm3, hemoglobin 11.7 g/dl; amoxicillin 500mg on 12/03/2020."
    summary = ("A 62-year-old man with platelets of 1 056 000 and hemoglobin 11,7 g/dl was given 750 mg amoxicillin "
               "on 2020-03-12; CRP 45.")
    # 62, 1 056 000, 11,7 and the date (12, 3, 2020 all in the report) are there; 750 and 45 are not: 2 of 6
    assert unsupported_numbers(summary, report, "en") == Share(2 / 6, 2, 6)


def test_unsupported_numbers_es_thousands_points_and_decimal_commas():
    report = "Paciente de 54 años con 1.500 plaquetas y PCR 12,5 mg/l; recibió 1.056.000 UI."
    # 54, 1500 (= 1.500), 12.5 (= 12,5) are there; 1,5 mg (= 1.5) is not: 1 of 4
    assert unsupported_numbers("Paciente de 54 años; 1500 plaquetas, PCR 12.5 mg/l y 1,5 mg de morfina.", report,
                               "es") == Share(1 / 4, 1, 4)
    # the same lone "1.500" is 1.5 in English, so the English reading finds no 1500
    assert unsupported_numbers("1500 plaquetas", report, "en") == Share(1.0, 1, 1)


def test_unsupported_numbers_fr_spaces_and_glued_units():
    report = "Homme de 70 ans, 230\u202f000 plaquettes, température 38,5 °C."
    # 70, 230 000, 38.5 are there; the 5 of 5mg is not: 1 of 4
    assert unsupported_numbers("Homme de 70 ans avec 230 000 plaquettes et 38.5 °C, traité 5mg.", report,
                               "fr") == Share(1 / 4, 1, 4)


def test_dates_need_every_component_in_the_report():
    assert unsupported_numbers("12/03/2020", "visto el 2020-03-12", "es").count == 0
    assert unsupported_numbers("12/03/2020", "visto el 12 de marzo de 2020", "es").count == 1  # no 3 written
    assert unsupported_numbers("en 2020", "visto el 12/03/2020", "es").count == 0  # a report date's year counts


def test_nothing_to_count_scores_zero():
    assert unsupported_numbers("", "report 5 mg", "en") == Share(0.0, 0, 0)
    assert unsupported_numbers("no numbers here", "report 5 mg", "pt") == Share(0.0, 0, 0)
    assert novel_terms("", "report", "en") == Share(0.0, 0, 0)
    assert novel_terms("it is on", "report", "en") == Share(0.0, 0, 0)  # short or stop words only


def test_content_words():
    # 3+ letters, lowercased, no stop words ("con"), no digits ("5mg" gives "mg": too short)
    assert [w for _, _, w in content_words("La Paciente presentó neumonía con 5mg", "es")] == [
        "paciente", "presentó", "neumonía"]
    with pytest.raises(ValueError, match="unknown language 'de'"):
        content_words("Fieber", "de")


def test_novel_terms_en():
    report = "The patient had fever; magnetic resonance imaging was performed."
    # content words: magnetic resonance angiography mra performed showing fevers (was: stop word);
    # fevers ~ fever and performed ~ performed by stem; angiography, mra, showing are new: 3 of 7
    assert novel_terms("A magnetic resonance angiography (MRA) was performed showing fevers", report,
                       "en") == Share(3 / 7, 3, 7)


def test_novel_terms_es_accents_do_not_matter():
    report = "La paciente presentó neumonía grave con fiebre alta."
    # paciente neumonia grave derrame pleural (con: stop word; y: too short); neumonia ~ neumonía: 2 of 5
    assert novel_terms("Paciente con neumonia grave y derrame pleural", report, "es") == Share(2 / 5, 2, 5)


def test_novel_terms_fr():
    report = "Le patient présentait une fièvre et une toux sèche depuis trois jours."
    # patient fièvre toux dyspnée trois jours (avec, depuis: stop words; et: too short): dyspnée is new, 1 of 6
    assert novel_terms("Patient avec fièvre, toux et dyspnée depuis trois jours", report, "fr") == Share(1 / 6, 1, 6)


def test_grounding_reads_numbers_with_the_same_reader():
    """The teacher's grounding now matches 1 056 000 with 1,056,000 and reads 1.500 by the record's language."""
    assert grounding_score("platelets 1 056 000", "platelets 1,056,000") == 1.0
    assert extract_facts("1.500 mg", "es") == {"1500 mg"} and extract_facts("1.500 mg") == {"1.5 mg"}
    assert grounding_score("1500 mg", "dosis 1.500 mg", "es") == 1.0
