"""Writes the two small demo datasets (chat format) that `make demo` trains on.

They are written for loramux, in the spirit of the first seed article (contract clauses,
SOAP notes); nothing is copied from it. Deterministic: running it again gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CLAUSES = {
    "confidentiality": (
        "Confidentiality. Each party shall keep the other party's Confidential Information "
        "secret, use it only to perform this Agreement, and disclose it only to employees "
        "and advisers who need to know it and are bound by duties no less protective. "
        "These obligations survive termination for {years} years."
    ),
    "termination": (
        "Termination. Either party may terminate this Agreement on {days} days' written "
        "notice. Either party may terminate at once by notice if the other party commits a "
        "material breach that remains uncured {cure} days after written notice of it."
    ),
    "limitation of liability": (
        "Limitation of Liability. Except for breach of confidentiality or fraud, neither "
        "party shall be liable for indirect or consequential loss, and each party's total "
        "liability under this Agreement shall not exceed the fees paid in the {months} "
        "months before the claim."
    ),
    "governing law": (
        "Governing Law. This Agreement and any dispute arising out of it shall be governed "
        "by the laws of {place}, and the courts of {place} shall have exclusive jurisdiction."
    ),
    "payment terms": (
        "Payment Terms. The Customer shall pay each undisputed invoice within {days} days of "
        "receipt. Late amounts bear interest at {rate} percent per month until paid in full."
    ),
    "force majeure": (
        "Force Majeure. Neither party is liable for delay caused by events beyond its "
        "reasonable control, provided it notifies the other party promptly and resumes "
        "performance as soon as practicable. If the delay exceeds {days} days, either party "
        "may terminate this Agreement."
    ),
    "assignment": (
        "Assignment. Neither party may assign or transfer this Agreement without the prior "
        "written consent of the other party, except to a successor to all of its business "
        "on {days} days' notice."
    ),
    "indemnification": (
        "Indemnification. The Supplier shall defend and indemnify the Customer against any "
        "third-party claim that the Services infringe intellectual property rights, and "
        "shall pay the damages and costs finally awarded, up to {months} months of fees."
    ),
}
LEGAL_ASKS = [
    "Draft a {kind} clause for a services agreement.",
    "Write the {kind} clause of our contract.",
    "We need a {kind} clause. Please draft it.",
    "Give me a standard {kind} clause.",
]
PLACES = ["England and Wales", "the State of New York", "Ontario", "Singapore", "Ireland"]

COMPLAINTS = [
    ("a dry cough for five days", "no fever", "temperature 37.1 C, clear lungs on auscultation",
     "acute viral bronchitis", "rest, fluids, honey for cough; return if fever or dyspnoea"),
    ("a sore throat and fever", "pain on swallowing", "temperature 38.4 C, tonsillar exudate",
     "suspected streptococcal pharyngitis", "rapid strep test; amoxicillin if positive"),
    ("lower back pain after lifting", "no numbness or weakness",
     "paraspinal tenderness, straight leg raise negative", "mechanical low back pain",
     "ibuprofen, stay active, physiotherapy referral if not better in two weeks"),
    ("headaches for two weeks", "worse at the end of the working day",
     "blood pressure 128/82, normal neurological exam", "tension-type headache",
     "sleep hygiene, screen breaks, paracetamol as needed; review in four weeks"),
    ("burning on urination", "frequency and urgency for two days",
     "temperature 36.9 C, suprapubic tenderness, dipstick positive for nitrites",
     "uncomplicated urinary tract infection", "nitrofurantoin for five days; fluids"),
    ("an itchy rash on both forearms", "started after gardening",
     "erythematous papules and vesicles in linear streaks", "allergic contact dermatitis",
     "topical corticosteroid twice daily, avoid the plant; review if spreading"),
    ("shortness of breath on exertion", "ankle swelling for a month",
     "bilateral pitting oedema, crackles at both lung bases", "suspected heart failure",
     "ECG, BNP and echocardiogram; start furosemide; review in one week"),
    ("a twisted ankle playing football", "able to bear weight with pain",
     "swelling over the lateral ligament, no bony tenderness", "lateral ankle sprain",
     "rest, ice, compression, elevation; gradual return to sport"),
]
MEDICAL_ASKS = [
    "Write a SOAP note: the patient reports {c}, {d}.",
    "Document this visit as a SOAP note. Patient presents with {c}; {d}.",
    "SOAP note please. Complaint: {c}. Details: {d}.",
]
AGES = [24, 31, 38, 45, 52, 67, 73]


def legal_rows(rng: random.Random) -> list[dict]:
    rows = []
    for kind, template in CLAUSES.items():
        for ask in rng.sample(LEGAL_ASKS, 3):
            text = template.format(years=rng.choice([2, 3, 5]), days=rng.choice([30, 60, 90]),
                                   cure=rng.choice([14, 30]), months=rng.choice([6, 12]),
                                   place=rng.choice(PLACES), rate=rng.choice(["1", "1.5"]))
            rows.append({"messages": [{"role": "user", "content": ask.format(kind=kind)},
                                      {"role": "assistant", "content": text}]})
    return rows


def medical_rows(rng: random.Random) -> list[dict]:
    rows = []
    for complaint, detail, exam, assessment, plan in COMPLAINTS:
        for ask in MEDICAL_ASKS:
            age = rng.choice(AGES)
            note = (f"S: {age}-year-old patient reports {complaint}, {detail}.\n"
                    f"O: {exam[0].upper() + exam[1:]}.\n"
                    f"A: {assessment[0].upper() + assessment[1:]}.\n"
                    f"P: {plan[0].upper() + plan[1:]}.")
            rows.append({"messages": [
                {"role": "user", "content": ask.format(c=complaint, d=detail)},
                {"role": "assistant", "content": note}]})
    return rows


def main() -> None:
    rng = random.Random(7)
    for name, rows in (("legal", legal_rows(rng)), ("medical", medical_rows(rng))):
        rng.shuffle(rows)
        with open(HERE / f"{name}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
