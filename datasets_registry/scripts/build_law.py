"""Build the `law` sample dataset (Alpaca JSONL) from the hand-written concept table below.

Run from the repository root: `python datasets_registry/scripts/build_law.py`. Deterministic:
no randomness, concepts and question styles are used in table order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE.parent / "samples" / "law"

# -----------------------------------------------------------------------------
# (term, area, definition, example). General common-law concepts written for this project,
# at the level of an introductory law course. Not legal advice for any jurisdiction.
CONCEPTS = [
    # contract
    ("offer", "contract", "An offer is a definite proposal to enter into a contract on specific terms, made with the intention that it becomes binding once the other party accepts it.", "A seller emails a buyer: 'I will sell you my car for 5,000 dollars.' That is an offer the buyer can accept."),
    ("acceptance", "contract", "Acceptance is the unqualified agreement of the offeree to all the terms of an offer, communicated to the offeror, which creates a binding contract.", "The buyer replies 'I accept your offer of the car for 5,000 dollars,' and a contract is formed."),
    ("consideration", "contract", "Consideration is something of value that each party gives or promises in exchange for the other's promise; in common-law systems it is what makes a promise enforceable as a contract.", "A pays 100 dollars and B promises to deliver a bicycle: the money and the promise to deliver are the consideration."),
    ("counteroffer", "contract", "A counteroffer is a reply to an offer that changes its terms; it rejects the original offer and becomes a new offer that the original offeror may accept or reject.", "Offered a car for 5,000 dollars, the buyer answers 'I will pay 4,500.' The original offer is rejected and a new offer is made."),
    ("invitation to treat", "contract", "An invitation to treat is an indication of willingness to negotiate, not an offer; it invites others to make offers.", "Goods displayed on a shop shelf with price tags are usually an invitation to treat; the customer makes the offer at the till."),
    ("breach of contract", "contract", "A breach of contract is a failure, without lawful excuse, to perform a duty the contract imposes, in whole or in part.", "A builder who stops work halfway through a house renovation without justification is in breach of contract."),
    ("anticipatory breach", "contract", "An anticipatory breach occurs when a party clearly indicates, before performance is due, that it will not perform its contractual obligations.", "A supplier writes in March that it will not deliver the goods due in June; the buyer may treat this as an anticipatory breach."),
    ("expectation damages", "contract", "Expectation damages are money awarded for breach of contract to put the injured party in the position it would have been in had the contract been performed.", "If a buyer must pay 1,200 dollars for goods it had contracted to buy for 1,000, expectation damages are usually the 200 dollar difference."),
    ("liquidated damages", "contract", "Liquidated damages are an amount fixed in the contract itself as compensation for a specified breach, enforceable if it is a genuine pre-estimate of loss rather than a penalty.", "A construction contract provides for 500 dollars per day of late completion."),
    ("specific performance", "contract", "Specific performance is an equitable remedy in which a court orders a party to carry out its contractual obligations, usually where money damages would be inadequate.", "A court may order the seller of a unique painting or a particular piece of land to complete the sale."),
    ("misrepresentation", "contract", "A misrepresentation is a false statement of fact made by one party that induces the other to enter into a contract, which may allow the contract to be rescinded and damages claimed.", "A seller falsely states that a car has never been in an accident, and the buyer relies on this when buying it."),
    ("duress", "contract", "Duress is illegitimate pressure, such as threats of violence or unlawful economic pressure, that coerces a party into a contract and makes the contract voidable.", "A person signs a contract after being threatened with physical harm."),
    ("undue influence", "contract", "Undue influence is the improper use of a position of trust or power over another person to obtain their agreement, making the resulting transaction voidable.", "A caregiver persuades an elderly dependent patient to sign over their house on unfavourable terms."),
    ("frustration", "contract", "Frustration discharges a contract when an unforeseen event, not caused by either party, makes performance impossible or radically different from what was agreed.", "A hall hired for a concert burns down before the concert date through no fault of either party."),
    ("force majeure clause", "contract", "A force majeure clause is a contract term that excuses or suspends a party's performance when specified events beyond its control, such as natural disasters or war, prevent performance.", "A shipping contract excuses delays caused by hurricanes or port closures."),
    ("condition", "contract", "A condition is an essential term of a contract; its breach entitles the innocent party to terminate the contract and claim damages.", "In a charter of a ship, the term that the ship will be ready to sail on a fixed date may be a condition."),
    ("warranty", "contract", "In contract law a warranty is a less important term whose breach gives a right to damages but not a right to terminate the contract.", "A promise that a delivered car comes with floor mats is likely a warranty."),
    ("privity of contract", "contract", "Privity of contract is the principle that only the parties to a contract can enforce it or be bound by it, subject to statutory and other exceptions.", "A gift recipient who is not a party to the shop's sale contract traditionally cannot sue the shop on that contract."),
    ("promissory estoppel", "contract", "Promissory estoppel prevents a party from going back on a clear promise that the other party relied on to its detriment, even without consideration, where that would be unjust.", "A landlord promises to accept reduced rent during a crisis, and the tenant relies on it; the landlord may be stopped from claiming the arrears for that period."),
    ("capacity", "contract", "Capacity is the legal ability to enter into a binding contract; minors and people lacking mental capacity may have limited capacity.", "A contract with a young child for an expensive luxury item is generally not enforceable against the child."),
    ("void contract", "contract", "A void contract is one that has no legal effect from the beginning, for example because its purpose is illegal.", "An agreement to pay someone to commit a crime is void."),
    ("voidable contract", "contract", "A voidable contract is valid until the party with the right to avoid it chooses to rescind it, for example because of misrepresentation or duress.", "A contract induced by a seller's fraudulent statements is voidable by the buyer."),
    ("rescission", "contract", "Rescission is the setting aside of a contract so that the parties are restored, as far as possible, to their positions before the contract was made.", "A buyer misled about a house returns it and gets the purchase price back."),
    ("mitigation of loss", "contract", "Mitigation of loss is the duty of a claimant to take reasonable steps to reduce the loss caused by a breach; losses that could reasonably have been avoided are not recoverable.", "A landlord whose tenant leaves early must make reasonable efforts to find a new tenant."),
    ("exclusion clause", "contract", "An exclusion clause is a contract term that limits or excludes one party's liability; courts and consumer statutes restrict when such clauses are effective.", "A car park ticket states that the operator is not liable for damage to vehicles."),
    ("parol evidence rule", "contract", "The parol evidence rule generally prevents parties from using evidence of earlier or contemporaneous oral agreements to contradict the terms of a complete written contract.", "A buyer cannot normally rely on a verbal promise of a lower price that contradicts the signed written price."),
    ("statute of frauds", "contract", "The statute of frauds is a rule requiring certain kinds of contracts, such as sales of land, to be in writing and signed to be enforceable.", "An oral agreement to sell a house is usually unenforceable because land contracts must be in writing."),
    ("implied term", "contract", "An implied term is a term not stated expressly in a contract but treated as part of it by law, custom, or the parties' obvious intention.", "A sale of goods by a business usually includes an implied term that the goods are of satisfactory quality."),
    ("unjust enrichment", "contract", "Unjust enrichment is the principle that a person who has been enriched at another's expense in circumstances the law treats as unjust must make restitution.", "A bank mistakenly transfers money into the wrong account; the recipient must normally return it."),
    ("quantum meruit", "contract", "Quantum meruit means 'as much as he has deserved' and allows recovery of a reasonable sum for work done where there is no enforceable agreement on price.", "A builder performs extra work at the owner's request without agreeing a price and recovers a reasonable amount for it."),
    # tort
    ("negligence", "tort", "Negligence is a tort in which a person who owes another a duty of care breaches that duty by failing to take reasonable care, causing damage that is not too remote.", "A driver who looks at a phone and hits a pedestrian may be liable in negligence."),
    ("duty of care", "tort", "A duty of care is a legal obligation to take reasonable care to avoid causing foreseeable harm to others who are closely affected by one's conduct.", "A doctor owes a duty of care to patients, and a driver owes one to other road users."),
    ("causation", "tort", "Causation is the requirement that the defendant's conduct actually caused the claimant's harm, often tested by asking whether the harm would have happened 'but for' the conduct.", "If a patient would have died anyway from the illness, a doctor's failure to examine them may not be the cause of death."),
    ("remoteness of damage", "tort", "Remoteness of damage limits liability to harm of a kind that was reasonably foreseeable as a result of the defendant's breach.", "Oil spilled into a harbour causes an unforeseeable fire; the defendant may not be liable for the fire damage."),
    ("contributory negligence", "tort", "Contributory negligence is the claimant's own failure to take reasonable care for their safety, which in many systems reduces the damages they receive.", "A passenger injured in a crash who was not wearing a seat belt may have damages reduced."),
    ("vicarious liability", "tort", "Vicarious liability makes one person, usually an employer, liable for torts committed by another, such as an employee acting in the course of employment.", "A delivery company is liable for injuries caused by its driver's careless driving during a delivery."),
    ("strict liability", "tort", "Strict liability is liability imposed without proof of fault or negligence, typically for abnormally dangerous activities or defective products.", "A company storing explosives may be liable for damage caused by an explosion even if it took care."),
    ("defamation", "tort", "Defamation is the publication of a false statement that damages a person's reputation; written or permanent forms are libel and spoken forms are slander.", "A newspaper falsely reports that a local shopkeeper sells stolen goods."),
    ("libel", "tort", "Libel is defamation in a permanent form, such as writing, print, broadcast or online posts.", "A false blog post claiming a named doctor falsified qualifications could be libel."),
    ("slander", "tort", "Slander is defamation in a transient form, usually spoken words, and in many systems requires proof of special damage except in certain categories.", "A person tells a crowd at a meeting, falsely, that a neighbour is a thief."),
    ("trespass to land", "tort", "Trespass to land is the direct and unjustified entry onto, or interference with, land in another person's possession.", "Walking across a neighbour's garden without permission is trespass to land."),
    ("nuisance", "tort", "Private nuisance is an unreasonable interference with a person's use or enjoyment of land, such as through noise, smells or vibrations.", "A factory that emits strong fumes every night into nearby homes may commit a nuisance."),
    ("battery", "tort", "Battery, in tort and criminal law, is the intentional and direct application of unlawful force or contact to another person.", "Punching someone, or spitting on them, is a battery."),
    ("assault", "tort", "Assault is an act that causes another person to reasonably apprehend the immediate application of unlawful force.", "Raising a fist at someone and threatening to hit them can be an assault even without contact."),
    ("false imprisonment", "tort", "False imprisonment is the unlawful total restraint of a person's freedom of movement, even for a short time.", "A shop guard locks a customer in a room without lawful grounds."),
    ("occupiers' liability", "tort", "Occupiers' liability is the duty of people who control premises to take reasonable care that visitors, and to a lesser degree trespassers, are reasonably safe.", "A supermarket that leaves a spill on the floor unmarked may be liable to a customer who slips."),
    ("product liability", "tort", "Product liability is the liability of manufacturers and suppliers for harm caused by defective products, often strict under consumer protection statutes.", "A manufacturer of a kettle that overheats and causes burns may be liable to the injured user."),
    ("res ipsa loquitur", "tort", "Res ipsa loquitur, 'the thing speaks for itself', allows negligence to be inferred where an accident would not ordinarily happen without negligence and the defendant controlled the cause.", "A surgical instrument is found inside a patient after an operation."),
    ("punitive damages", "tort", "Punitive damages, also called exemplary damages, are awarded in some systems to punish a defendant for outrageous conduct and deter others, beyond compensating the claimant.", "A company that knowingly hid a dangerous defect might face punitive damages in some jurisdictions."),
    ("volenti non fit injuria", "tort", "Volenti non fit injuria is the defence that the claimant freely and knowingly consented to the risk of harm.", "A spectator at a sports event who is hit by a ball in the ordinary course of play may be met with this defence."),
    ("eggshell skull rule", "tort", "The eggshell skull rule means a defendant must take the victim as they find them and is liable for the full harm even if the victim was unusually vulnerable.", "A minor blow causes severe injury because the victim had a rare bone condition; the defendant is liable for the whole injury."),
    ("economic loss", "tort", "Pure economic loss is financial loss not resulting from physical damage to the claimant's person or property, and is recoverable in negligence only in limited situations.", "A business loses profits because a contractor carelessly cuts a power cable belonging to someone else."),
    # criminal
    ("actus reus", "criminal", "Actus reus is the physical element of a crime: the prohibited act, omission or state of affairs.", "In theft, the act of taking property belonging to another is the actus reus."),
    ("mens rea", "criminal", "Mens rea is the mental element of a crime, such as intention, recklessness or knowledge, that must accompany the actus reus.", "For murder, the prosecution usually must prove an intention to kill or to cause serious harm."),
    ("burden of proof", "criminal", "The burden of proof is the obligation to prove the facts in issue; in criminal cases it lies on the prosecution.", "An accused does not have to prove innocence; the prosecution must prove guilt."),
    ("beyond reasonable doubt", "criminal", "Beyond reasonable doubt is the standard of proof in criminal cases: the fact-finder must be sure of the defendant's guilt.", "If jurors have a real doubt about whether the defendant was present, they must acquit."),
    ("self-defence", "criminal", "Self-defence is a defence to the use of force where a person honestly believed force was necessary to protect themselves or others and the force used was reasonable.", "A person pushes away an attacker who is swinging a bottle at them."),
    ("insanity defence", "criminal", "The insanity defence applies where, because of a disease of the mind, the defendant did not know the nature of the act or that it was wrong.", "A defendant in a psychotic state believed they were breaking a jar, not strangling a person."),
    ("diminished responsibility", "criminal", "Diminished responsibility is a partial defence to murder in some systems, reducing it to manslaughter where an abnormality of mental functioning substantially impaired the defendant.", "A defendant with a recognised mental condition kills while their self-control is severely impaired."),
    ("manslaughter", "criminal", "Manslaughter is an unlawful killing without the mental element for murder, or with it where a partial defence applies.", "A person kills another by a grossly negligent act, such as a fatal mistake by a reckless electrician."),
    ("murder", "criminal", "Murder is the unlawful killing of a human being with malice aforethought, which usually means an intention to kill or to cause serious bodily harm.", "A person who deliberately poisons another to kill them commits murder."),
    ("theft", "criminal", "Theft is the dishonest appropriation of property belonging to another with the intention of permanently depriving the other of it.", "Taking a laptop from a café table and keeping it is theft."),
    ("robbery", "criminal", "Robbery is theft accompanied by the use or threat of force at the time of, or in order to, steal.", "Threatening a shopkeeper with a knife to take money from the till is robbery."),
    ("burglary", "criminal", "Burglary is entering a building or part of a building as a trespasser with intent to commit certain offences, such as theft, or committing them after entering.", "Breaking into a house through a window to steal jewellery is burglary."),
    ("fraud", "criminal", "Fraud is dishonest deception or abuse of position intended to make a gain or cause a loss to another.", "Selling fake concert tickets online while claiming they are genuine is fraud."),
    ("attempt", "criminal", "An attempt is doing an act that is more than merely preparatory to committing an offence, with intent to commit it.", "Pointing a loaded gun at a victim and pulling the trigger, when the gun jams, is an attempt."),
    ("conspiracy", "criminal", "Conspiracy is an agreement between two or more people to commit a crime; the agreement itself can be an offence.", "Two people agree and plan to rob a bank, even if they are arrested before acting."),
    ("accessory", "criminal", "An accessory, or secondary party, is someone who aids, abets, counsels or procures another to commit a crime and can be liable for that crime.", "A person who drives the getaway car for a robbery is an accessory."),
    ("entrapment", "criminal", "Entrapment occurs when state agents induce a person to commit an offence they would not otherwise have committed; it may lead to a defence or exclusion of evidence.", "Police persistently pressure a reluctant person into selling drugs they never intended to sell."),
    ("double jeopardy", "criminal", "Double jeopardy is the principle that a person should not be tried or punished twice for the same offence after acquittal or conviction, subject to narrow exceptions.", "After a jury acquits someone of an assault, the prosecution generally cannot try them again for the same assault."),
    ("plea bargain", "criminal", "A plea bargain is an agreement in which the defendant pleads guilty, often to a lesser charge, in exchange for a concession from the prosecution.", "A defendant pleads guilty to theft in return for the prosecution dropping a burglary charge."),
    ("presumption of innocence", "criminal", "The presumption of innocence is the principle that a person accused of a crime is treated as innocent until proven guilty according to law.", "A court must not treat the fact of arrest as evidence that the accused committed the offence."),
    ("strict liability offence", "criminal", "A strict liability offence is a crime that does not require proof of mens rea for at least one element of the actus reus.", "Many speeding offences can be committed even if the driver did not know they were speeding."),
    ("bail", "criminal", "Bail is the release of an accused person from custody pending trial, often subject to conditions that secure their return to court.", "A defendant is released on condition that they live at a given address and report to a police station weekly."),
    ("habeas corpus", "constitutional", "Habeas corpus is a court order requiring that a detained person be brought before the court so that the lawfulness of the detention can be examined.", "A person held without charge applies for habeas corpus, and the court orders their release if detention is unlawful."),
    # procedure and evidence
    ("hearsay", "evidence", "Hearsay is an out-of-court statement offered to prove the truth of what it asserts; it is generally excluded unless an exception applies.", "A witness testifies, 'My friend told me the defendant was at the scene,' to prove the defendant was there."),
    ("burden of persuasion in civil cases", "evidence", "In civil cases the claimant usually bears the burden of proving its case on the balance of probabilities, meaning more likely than not.", "A claimant wins a debt claim by showing that it is more likely than not the money was lent and not repaid."),
    ("balance of probabilities", "evidence", "The balance of probabilities is the civil standard of proof: a fact is proven if it is more likely than not to be true.", "A court finds that a contract was signed because the evidence makes that more probable than not."),
    ("affidavit", "procedure", "An affidavit is a written statement of facts sworn or affirmed before an authorised person, used as evidence.", "A witness signs an affidavit before a notary describing what they saw."),
    ("subpoena", "procedure", "A subpoena is a court order requiring a person to attend court to give evidence or to produce documents.", "A bank manager is served with a subpoena to bring account records to trial."),
    ("discovery", "procedure", "Discovery, or disclosure, is the pre-trial process by which parties obtain relevant documents and information from each other.", "Each side in a contract dispute must produce the emails relating to the deal."),
    ("summary judgment", "procedure", "Summary judgment is a decision by the court without a full trial where there is no genuine dispute of material fact or one side has no real prospect of success.", "A court gives judgment on an unpaid invoice where the defendant admits the debt and raises no real defence."),
    ("injunction", "procedure", "An injunction is a court order requiring a party to do, or more often to refrain from doing, a specific act.", "A court orders a former employee not to use the employer's confidential client list."),
    ("statute of limitations", "procedure", "A statute of limitations sets the time limit within which legal proceedings must be started; after it expires the claim is usually barred.", "A contract claim brought many years after the breach may be time-barred."),
    ("standing", "procedure", "Standing is the right of a party to bring a claim, based on having a sufficient interest in or connection to the matter.", "A person unaffected by a planning decision may lack standing to challenge it in court."),
    ("jurisdiction", "procedure", "Jurisdiction is the authority of a court to hear and decide a case, determined by subject matter, territory and the parties involved.", "A small-claims court may lack jurisdiction over a claim above its monetary limit."),
    ("class action", "procedure", "A class action is a lawsuit in which one or more claimants sue on behalf of a larger group who have similar claims.", "Thousands of customers overcharged by the same bank fee bring one collective action."),
    ("appeal", "procedure", "An appeal is a request to a higher court to review and change the decision of a lower court, usually on points of law or serious errors.", "A defendant convicted at trial appeals on the ground that the judge misdirected the jury."),
    ("precedent", "procedure", "Precedent, or stare decisis, is the principle that courts follow the legal rulings of earlier decisions, especially those of higher courts, in similar cases.", "A lower court applies a supreme court ruling on the duty of care to a new negligence case."),
    ("obiter dictum", "procedure", "An obiter dictum is a remark in a judgment that is not necessary to the decision; it can be persuasive but is not binding precedent.", "A judge comments on what the result would have been on different facts."),
    ("ratio decidendi", "procedure", "The ratio decidendi is the legal principle or reasoning necessary for the court's decision, which forms the binding part of a precedent.", "The rule that manufacturers owe a duty of care to consumers was the ratio of a famous negligence case."),
    ("res judicata", "procedure", "Res judicata prevents the same parties from relitigating a claim or issue that a competent court has already finally decided.", "A claimant who lost a debt claim cannot sue the same defendant again for the same debt."),
    ("arbitration", "procedure", "Arbitration is a private dispute resolution process in which the parties submit their dispute to one or more arbitrators whose decision, the award, is usually binding.", "Two companies refer a supply dispute to an arbitrator under an arbitration clause in their contract."),
    ("mediation", "procedure", "Mediation is a voluntary process in which a neutral mediator helps the parties negotiate their own settlement; the mediator does not impose a decision.", "A divorcing couple uses a mediator to agree arrangements for their children."),
    ("default judgment", "procedure", "A default judgment is a judgment given against a defendant who fails to respond to a claim or appear within the time allowed.", "A company ignores a court claim for unpaid rent and the landlord obtains default judgment."),
    # property and trusts
    ("easement", "property", "An easement is a right over another person's land for the benefit of one's own land, such as a right of way or a right to light.", "A homeowner has a right to cross a neighbour's driveway to reach the road."),
    ("adverse possession", "property", "Adverse possession allows a person who has occupied land openly, exclusively and without permission for a statutory period to acquire title to it.", "Someone fences in and uses a strip of a neighbour's land for many years and may claim it."),
    ("freehold", "property", "A freehold is ownership of land and buildings for an unlimited duration.", "A person who buys a detached house outright usually acquires the freehold."),
    ("leasehold", "property", "A leasehold is the right to exclusive possession of land or property for a fixed or periodic term granted by the owner.", "A flat sold on a 99-year lease is a leasehold interest."),
    ("mortgage", "property", "A mortgage is a security interest over property given to a lender to secure a loan, which lets the lender sell the property if the loan is not repaid.", "A buyer borrows from a bank to buy a house, and the bank takes a mortgage over it."),
    ("joint tenancy", "property", "A joint tenancy is co-ownership in which each owner holds the whole property together with the others, with a right of survivorship on death.", "When one of two joint tenants dies, the survivor automatically owns the whole property."),
    ("tenancy in common", "property", "A tenancy in common is co-ownership in which each owner has a distinct share that passes under their will or intestacy, with no right of survivorship.", "Two friends own a flat 60:40 as tenants in common, and each can leave their share to someone else."),
    ("covenant", "property", "A covenant is a promise in a deed; restrictive covenants on land can limit how it may be used and may bind later owners.", "A covenant forbids building more than one house on a plot."),
    ("trust", "trusts", "A trust is an arrangement in which trustees hold legal title to property for the benefit of beneficiaries, under duties enforced by the courts.", "A parent transfers shares to trustees to hold for their children until they turn 25."),
    ("fiduciary duty", "trusts", "A fiduciary duty is a duty of loyalty and good faith owed by someone in a position of trust, such as a trustee, agent or company director, to act in the other's interest.", "A trustee must not buy trust property for themselves at a low price."),
    ("beneficiary", "trusts", "A beneficiary is a person entitled to benefit from a trust, will or insurance policy.", "A child named to receive income from a trust fund is a beneficiary."),
    ("will", "succession", "A will is a legal document in which a person sets out how their property is to be distributed after death and may appoint executors and guardians.", "A person signs a will, witnessed as the law requires, leaving their house to their partner."),
    ("intestacy", "succession", "Intestacy is the situation in which a person dies without a valid will; their estate passes under statutory rules to relatives.", "A person dies with no will and their estate passes to their spouse and children under statute."),
    ("executor", "succession", "An executor is the person appointed in a will to administer the estate: collect assets, pay debts and distribute the rest.", "The executor sells the deceased's car and pays the proceeds to the beneficiaries."),
    ("probate", "succession", "Probate is the court process that confirms a will is valid and authorises the executor to deal with the estate.", "A bank releases the deceased's account funds to the executor after probate is granted."),
    ("power of attorney", "succession", "A power of attorney is a legal document by which one person authorises another to act on their behalf in financial, legal or health matters.", "An elderly person grants a lasting power of attorney so that their daughter can manage their finances."),
    # company, employment, IP
    ("limited liability", "company", "Limited liability means that shareholders of a company are not personally liable for its debts beyond the amount they invested or agreed to pay for their shares.", "If a company fails owing money, its shareholders generally lose only their investment."),
    ("separate legal personality", "company", "Separate legal personality is the principle that a company is a legal person distinct from its shareholders and directors, able to own property, sue and be sued.", "A company, not its owner, is the party to contracts the company signs."),
    ("piercing the corporate veil", "company", "Piercing the corporate veil is the rare judicial step of disregarding a company's separate personality, for example where it is used as a sham to evade legal obligations.", "A person forms a company solely to avoid a non-compete agreement, and the court treats the company's acts as theirs."),
    ("director's duties", "company", "Directors owe duties to the company, such as to act within their powers, promote its success, exercise reasonable care and skill, and avoid conflicts of interest.", "A director who diverts a business opportunity to their own firm breaches their duties."),
    ("insolvency", "company", "Insolvency is the state of being unable to pay debts as they fall due, or of having liabilities greater than assets.", "A company that cannot pay its suppliers and staff on time is insolvent."),
    ("unfair dismissal", "employment", "Unfair dismissal is the termination of an employee's contract without a fair reason or a fair procedure, giving statutory remedies in many systems.", "An employee is dismissed without warning or investigation for a single minor mistake."),
    ("wrongful dismissal", "employment", "Wrongful dismissal is dismissal in breach of the employment contract, for example without the notice the contract requires.", "An employer fires an employee on the spot without the one month's notice required by the contract."),
    ("constructive dismissal", "employment", "Constructive dismissal occurs when an employee resigns because the employer has committed a serious breach of the employment contract.", "An employer cuts an employee's salary in half without agreement, and the employee resigns."),
    ("discrimination", "employment", "Unlawful discrimination is less favourable treatment of a person because of a protected characteristic, such as sex, race, religion, age or disability.", "Refusing to promote a qualified employee because of their religion is direct discrimination."),
    ("non-compete clause", "employment", "A non-compete clause restricts an employee from working for competitors for a period after employment ends; it is enforceable only if reasonable in scope to protect legitimate interests.", "A sales manager agrees not to join a direct competitor in the same city for six months."),
    ("copyright", "intellectual property", "Copyright is a property right in original works such as writing, music, art and software, giving the author exclusive rights to copy, distribute and adapt them for a limited time.", "A novelist controls who may publish or translate their novel."),
    ("patent", "intellectual property", "A patent is an exclusive right granted for an invention that is new, inventive and industrially applicable, usually for up to 20 years in exchange for public disclosure.", "A company patents a new type of battery and can stop others making it without a licence."),
    ("trademark", "intellectual property", "A trademark is a sign, such as a word or logo, that distinguishes the goods or services of one business from others, and its registration gives exclusive rights to use it.", "A drinks company registers its logo so competitors cannot use a confusingly similar one."),
    ("fair use", "intellectual property", "Fair use, or fair dealing, is a defence permitting limited use of copyright material without permission for purposes such as criticism, news reporting, research or parody.", "A film critic quotes a short passage from a film's script in a review."),
    ("trade secret", "intellectual property", "A trade secret is confidential business information that has commercial value because it is secret and that the owner takes reasonable steps to protect.", "A company's secret recipe for a soft drink is protected as a trade secret."),
    ("licence", "intellectual property", "A licence is permission from the owner of a right, such as copyright or a patent, for another to do something that would otherwise infringe it, often on agreed terms.", "A software company grants users a licence to install its program on one computer."),
    # public and constitutional
    ("judicial review", "constitutional", "Judicial review is the process by which courts examine the lawfulness of decisions or actions of public bodies, for example for illegality, irrationality or procedural unfairness.", "A court quashes a minister's decision that was made without following the required consultation."),
    ("separation of powers", "constitutional", "The separation of powers is the division of state power between the legislature, the executive and the judiciary so that each checks the others.", "Courts can declare executive action unlawful, while the legislature makes the laws."),
    ("rule of law", "constitutional", "The rule of law is the principle that everyone, including the government, is subject to the law, which should be clear, public and applied equally by independent courts.", "A government official must have legal authority for an act and can be challenged in court."),
    ("due process", "constitutional", "Due process is the requirement that the state respects fair legal procedures, such as notice and a fair hearing, before depriving a person of life, liberty or property.", "A person must be told the charges and given a chance to answer them before being punished."),
    ("natural justice", "constitutional", "Natural justice refers to two basic rules of fair procedure: the right to a fair hearing and the rule against bias.", "A tribunal member who owns shares in one party must not decide the case."),
    ("ultra vires", "constitutional", "Ultra vires means 'beyond the powers' and describes an act by a public body or company that exceeds the legal authority it has.", "A local council imposes a tax that no statute authorises it to levy."),
    ("legitimate expectation", "constitutional", "A legitimate expectation arises when a public body by a clear promise or practice leads a person to expect a certain procedure or benefit, which it may not frustrate unfairly.", "An agency promises residents of a care home that it will be their home for life, then tries to close it without justification."),
    ("delegated legislation", "constitutional", "Delegated legislation is law made by a body other than the legislature, such as a minister, under powers given by a parent statute.", "A minister issues regulations setting fees under powers given in an Act."),
    # family
    ("custody", "family", "Custody, often now called residence or parental responsibility, concerns with whom a child lives and who makes major decisions about the child's upbringing.", "After separation, a court decides that a child will live mainly with one parent."),
    ("best interests of the child", "family", "The best interests of the child is the principle that in decisions about children the child's welfare is the paramount consideration.", "A court decides contact arrangements by focusing on what benefits the child, not on the parents' wishes."),
    ("prenuptial agreement", "family", "A prenuptial agreement is a contract made before marriage that sets out how the couple's property will be divided if they divorce; its enforceability varies between jurisdictions.", "A couple agrees before marriage that a family business will remain with the spouse who owns it."),
    ("alimony", "family", "Alimony, or spousal maintenance, is financial support paid by one former spouse to the other after separation or divorce.", "A court orders a higher-earning spouse to pay monthly maintenance for three years."),
    ("child support", "family", "Child support is regular payment by a parent towards the costs of raising a child who does not live with them.", "A non-resident parent pays a monthly amount towards the child's food, clothing and housing."),
]

# Train question styles (instruction, input) and eval styles that never appear in train.
TRAIN_STYLES = [
    lambda t, a: ("Define the following legal term.", t),
    lambda t, a: (f"What does '{t}' mean in {a} law?", ""),
    lambda t, a: (f"Give a short example that illustrates {t}.", ""),
]
EVAL_STYLES = [
    lambda t, a: ("Explain this concept in plain English and give an example.", t),
    lambda t, a: (f"A student asks what '{t}' means. Answer briefly.", ""),
]


def build() -> tuple[list[dict], list[dict]]:
    train, eval_ = [], []
    for i, (term, area, definition, example) in enumerate(CONCEPTS):
        answers = [definition, f"{definition} It belongs to {area} law.", f"Example: {example}"]
        for style, answer in zip(TRAIN_STYLES, answers):
            instruction, input_ = style(term, area)
            train.append({"instruction": instruction, "input": input_, "output": answer})
        # every concept gets one eval question, with a phrasing and answer shape unseen in train
        instruction, input_ = EVAL_STYLES[i % 2](term, area)
        eval_.append({"instruction": instruction, "input": input_,
                      "output": f"{definition} For example: {example[0].lower()}{example[1:]}"})
    return train, eval_


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, eval_ = build()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", eval_)
    print(f"{len(CONCEPTS)} concepts -> {len(train)} train, {len(eval_)} eval rows")


if __name__ == "__main__":
    main()
